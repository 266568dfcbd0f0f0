"""`tunelab compare` trains each method on the same data and tabulates them."""
import csv
import json

from tunelab.cli import main


def test_compare_tabulates_methods_and_reports_failures(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "cmp"
    overrides = [o for o in tiny_overrides if not o.startswith(("run_dir=", "train.lr="))]
    overrides += ["train.epochs=4"]
    code = main(["compare", *overrides, "--methods", "full,freeze,lora,nosuchmethod",
                 "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["full", "freeze", "lora", "nosuchmethod"]
    assert by["nosuchmethod"]["status"] == "failed"
    assert "unknown method" in by["nosuchmethod"]["error"]
    for name in ("full", "freeze", "lora"):
        r = by[name]
        assert r["status"] == "ok", r
        assert 0 <= r["test"] <= 1 and r["artifact_mb"] > 0 and r["peak_rss_mb"] > 0
    assert by["full"]["trainable_percent"] == 100
    assert by["freeze"]["trainable_percent"] < by["lora"]["trainable_percent"] < 100
    assert by["freeze"]["artifact_mb"] < by["full"]["artifact_mb"]
    # each method used its own default learning rate
    assert by["full"]["lr"] != by["lora"]["lr"]
    with open(out / "comparison.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "| lora |" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").stat().st_size > 5000
    assert (out / "nosuchmethod.log").exists()
