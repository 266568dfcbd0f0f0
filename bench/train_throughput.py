"""Training throughput: tunelab against `transformers.Trainer`, on SST-2 with MiniLM.

For full fine-tuning and for LoRA, three configurations train on the same rows with the same
hyper-parameters (batch 32, the method's tunelab default lr, warm-up 6% then linear decay,
weight decay 0.01, seed 42, max length 128):

  trainer_default  Trainer as most users run it: inputs padded to 128, fp32, random order
  trainer_tuned    Trainer configured well: bf16, dynamic padding, length-grouped sampling
  tunelab          tunelab's defaults (length-sorted batches, bf16 autocast where fast)
  tunelab_torch_dropout   the same with train.fast_dropout=false: what the cheaper dropout
                   masks (tunelab.train.dropout) bring

Each configuration runs in its own child process, so the peak RSS is its own. Reported:
training seconds (the steps only: no model loading, no evaluation), samples/s, real
(non-padding) tokens/s, peak RSS and SST-2 test accuracy.

    .venv/bin/python bench/train_throughput.py                  # full size (see bench/README.md)
    .venv/bin/python bench/train_throughput.py --train-rows 256 --only full --markdown ''
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from mfu import mfu, model_shapes, probe_matmul_peak  # noqa: E402

NAME = "train_throughput"
METHODS = ("full", "lora")
CONFIGS = ("trainer_default", "trainer_tuned", "tunelab", "tunelab_torch_dropout")
VARIANTS = {  # tunelab with one of its speed-ups off: (run-directory suffix, override)
    "tunelab_torch_dropout": ("-torch-dropout", "train.fast_dropout=false"),
}
BATCH_SIZE, MAX_LENGTH, WARMUP_RATIO, WEIGHT_DECAY, SEED = 32, 128, 0.06, 0.01, 42
EVAL_BATCH_SIZE = 64  # evaluation is not timed; 64 only keeps the benchmark shorter
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}  # tunelab's defaults, for every configuration


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, NAME)
    parser.add_argument("--train-rows", type=int, default=None,
                        help="train on a label-stratified subset of N rows (default: all 6920)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    parser.add_argument("--only", default=",".join(METHODS),
                        help=f"methods to measure, comma-separated ({', '.join(METHODS)})")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"configurations to measure, comma-separated ({', '.join(CONFIGS)})")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each configuration but trainer_default (which takes ~200 s "
                             "and runs once), in interleaved rounds; each row is the median run "
                             "(default 3: single runs drift ±10%% on a shared machine)")
    parser.add_argument("--scaling", default="",
                        help="also train tunelab full on 1x,2x,4x... the --train-rows "
                             "(comma-separated multiples, e.g. 1,2,4) to check that time grows "
                             "linearly with rows")
    parser.add_argument("--child", nargs=3, metavar=("JOB_JSON", "KEY", "OUT_JSON"),
                        help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args(argv)
    args.methods = pick(args.only, METHODS, "--only")
    args.configs = pick(args.configs, CONFIGS, "--configs")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        args.scaling = [int(x) for x in args.scaling.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--scaling: expected comma-separated integers, got {args.scaling!r}")
    return args


def pick(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in chosen if x not in allowed]
    if bad or not chosen:
        raise SystemExit(f"{flag}: unknown {', '.join(bad) or '(empty)'}; "
                         f"choose from {', '.join(allowed)}")
    return chosen


# --------------------------------------------------------------------------------------------
# data: the same files for every configuration


def read_labeltext(path: Path) -> list[tuple[int, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, _, text = line.strip().partition(" ")
        if label not in ("0", "1") or not text:
            raise SystemExit(f"{path}:{number}: expected 'LABEL sentence' with LABEL 0 or 1")
        rows.append((int(label), text))
    return rows


def stratified_first(rows: list[tuple[int, str]], n: int) -> list[tuple[int, str]]:
    """The first rows of each label, in label proportions, in the file's order."""
    by_label: dict[int, list[int]] = {}
    for i, (label, _) in enumerate(rows):
        by_label.setdefault(label, []).append(i)
    shares = {k: n * len(v) / len(rows) for k, v in by_label.items()}
    quota = {k: int(s) for k, s in shares.items()}
    for k in sorted(shares, key=lambda k: quota[k] - shares[k])[:n - sum(quota.values())]:
        quota[k] += 1  # largest remainders
    keep = sorted(i for k, idx in by_label.items() for i in idx[:quota[k]])
    return [rows[i] for i in keep]


def prepare_data(args, workdir: Path) -> dict:
    sst2 = args.data_dir / "sst2"
    paths = {split: sst2 / f"{split}.txt" for split in ("train", "dev", "test")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"SST-2 files missing: {', '.join(missing)} (set --data-dir)")
    train = read_labeltext(paths["train"])
    if args.train_rows is not None and args.train_rows < len(train):
        train = stratified_first(train, args.train_rows)
        paths["train"] = workdir / "train.txt"
        paths["train"].write_text("".join(f"{y} {x}\n" for y, x in train), encoding="utf-8")
    tokens = count_tokens([x for _, x in train])
    return {"paths": {k: str(v) for k, v in paths.items()}, "train_rows": len(train),
            "real_tokens_per_epoch": tokens, "padded_tokens_per_epoch": len(train) * MAX_LENGTH,
            "positive_share": sum(y for y, _ in train) / len(train)}


def count_tokens(texts: list[str]) -> int:
    """Real (non-padding) tokens after truncation to MAX_LENGTH, special tokens included."""
    from transformers import AutoTokenizer

    from tunelab.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    return sum(len(ids) for ids in tok(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"])


# --------------------------------------------------------------------------------------------
# children: one configuration each


def child_main(job_file: str, key: str, out_file: str) -> None:
    import torch

    job = json.loads(Path(job_file).read_text())
    method, config = key.split(":")
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # what tunelab uses by default
    if method == "probe":
        result = probe_matmul_peak(job, BATCH_SIZE)
    elif config.startswith("scaling"):
        result = run_tunelab({**job, "paths": {**job["paths"], "train": job["scaling"][config]}},
                             method, suffix=config)
    elif config == "tunelab":
        result = run_tunelab(job, method)
    elif config in VARIANTS:
        suffix, override = VARIANTS[config]
        result = run_tunelab(job, method, suffix=suffix, extra=(override,))
    else:
        result = run_trainer(job, method, tuned=config == "trainer_tuned")
    common.write_json(Path(out_file), result)


def run_tunelab(job: dict, method: str, suffix: str = "", extra: tuple = ()) -> dict:
    from tunelab.config import resolve_config
    from tunelab.train.loop import train

    p = job["paths"]
    overrides = [
        "model.name=minilm", f"model.max_length={MAX_LENGTH}", "data.format=labeltext",
        f"data.train={p['train']}", f"data.validation={p['dev']}", f"data.test={p['test']}",
        f"method.name={method}", f"train.epochs={job['epochs']}", f"train.lr={job['lr'][method]}",
        f"train.batch_size={BATCH_SIZE}", f"train.warmup_ratio={WARMUP_RATIO}",
        "train.schedule=linear", f"train.weight_decay={WEIGHT_DECAY}", f"train.seed={SEED}",
        "train.tracker=none", f"run_dir={Path(job['workdir']) / f'tunelab-{method}{suffix}'}",
        *extra]
    shutil.rmtree(Path(job["workdir"]) / f"tunelab-{method}{suffix}", ignore_errors=True)
    run_dir = train(resolve_config(overrides=overrides), quiet=True)  # the previous repeat's gone
    results = json.loads((run_dir / "results.json").read_text())
    t = results["train"]
    return {"train_seconds": t["seconds"], "test_accuracy": results["test"]["accuracy"],
            "precision": t["precision"], "steps": t["steps"],
            "trainable_params": t["trainable_params"], "total_params": t["total_params"],
            "own_tokens_per_s": t["tokens_per_s"]}


class TokenizedDataset:
    """A `datasets`-free map-style dataset: dict items as Trainer's collators expect."""

    def __init__(self, encoding, labels: list[int]):
        self.encoding, self.labels = encoding, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.encoding.items()}
        item["labels"] = self.labels[i]
        return item


def trainer_data(tokenizer, path: str, tuned: bool) -> TokenizedDataset:
    rows = read_labeltext(Path(path))
    # default: every input padded to max_length (what most Trainer examples do)
    enc = tokenizer([x for _, x in rows], truncation=True, max_length=MAX_LENGTH,
                    padding=False if tuned else "max_length")
    return TokenizedDataset(enc, [y for y, _ in rows])


def trainer_model(path: str, method: str):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(SEED)  # the new head's initial weights
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2,
                                                               dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        from tunelab.methods.lora import DEFAULT_TARGETS

        model = get_peft_model(model, LoraConfig(
            task_type="SEQ_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"], target_modules=DEFAULT_TARGETS["encoder"],
            modules_to_save=["classifier"]))
    return model


def run_trainer(job: dict, method: str, tuned: bool) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, default_data_collator)

    from tunelab.models import resolve_model

    path = resolve_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_ds = trainer_data(tokenizer, job["paths"]["train"], tuned)
    test_ds = trainer_data(tokenizer, job["paths"]["test"], tuned)
    model = trainer_model(path, method)
    steps = math.ceil(len(train_ds) / BATCH_SIZE) * job["epochs"]
    args = TrainingArguments(
        output_dir=str(Path(job["workdir"]) / f"trainer-{method}-{int(tuned)}"),
        per_device_train_batch_size=BATCH_SIZE, per_device_eval_batch_size=EVAL_BATCH_SIZE,
        learning_rate=job["lr"][method], num_train_epochs=job["epochs"],
        warmup_steps=int(steps * WARMUP_RATIO),  # tunelab's rounding; >= 1 means steps
        lr_scheduler_type="linear", weight_decay=WEIGHT_DECAY, seed=SEED,
        bf16=tuned, train_sampling_strategy="group_by_length" if tuned else "random",
        use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to="none",
        disable_tqdm=True, label_names=["labels"])
    collator = DataCollatorWithPadding(tokenizer) if tuned else default_data_collator
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    t0 = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - t0
    prediction = trainer.predict(test_ds)
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) \
        else prediction.predictions
    # label_ids come back in the order of the predictions: with length-grouped sampling
    # Trainer reorders the test set too, so comparing with test_ds.labels would be wrong
    accuracy = float((np.argmax(logits, -1) == np.asarray(prediction.label_ids)).mean())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"train_seconds": round(seconds, 2), "test_accuracy": accuracy,
            "precision": "bf16" if tuned else "fp32", "steps": output.global_step,
            "trainable_params": trainable, "total_params": sum(p.numel() for p in model.parameters()),
            "trainer_train_runtime": output.metrics.get("train_runtime")}


# --------------------------------------------------------------------------------------------
# the driver


def measure(job_file: Path, job: dict, method: str, config: str) -> dict:
    out = Path(job["workdir"]) / f"result-{method}-{config}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(job_file),
            f"{method}:{config}", str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    child = common.run_child(argv, env=env)
    row = {"method": method, "config": config, "peak_rss_mb": round(child.peak_rss_mb, 1),
           "process_seconds": round(child.wall_seconds, 2)}
    if child.returncode != 0 or not out.is_file():
        return {**row, "error": f"exit code {child.returncode}: {child.output_tail[-2000:]}"}
    result = json.loads(out.read_text())
    samples = job["train_rows"] * job["epochs"]
    tokens = job["real_tokens_per_epoch"] * job["epochs"]
    seconds = max(result["train_seconds"], 1e-9)
    return {**row, **result, "samples_per_s": round(samples / seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def scaling_files(args, data: dict, workdir: Path) -> dict:
    """{"scaling-2x": path, ...}: the first N x multiple training rows (stratified) per
    --scaling multiple, N = the benchmark's training rows."""
    if not args.scaling:
        return {}
    rows = read_labeltext(args.data_dir / "sst2" / "train.txt")
    out = {}
    for multiple in args.scaling:
        n = data["train_rows"] * multiple
        if n > len(rows):
            raise SystemExit(f"--scaling {multiple}: {n} rows wanted, SST-2 has {len(rows)}; "
                             f"lower --train-rows")
        path = workdir / f"train-{multiple}x.txt"
        path.write_text("".join(f"{y} {x}\n" for y, x in stratified_first(rows, n)),
                        encoding="utf-8")
        out[f"scaling-{multiple}x"] = str(path)
    return out


def probe(job_file: Path, job: dict) -> dict:
    out = Path(job["workdir"]) / "result-probe.json"
    child = common.run_child([sys.executable, str(Path(__file__).resolve()), "--child",
                              str(job_file), "probe:matmul", str(out)])
    if child.returncode != 0 or not out.is_file():
        return {"error": f"exit code {child.returncode}: {child.output_tail[-2000:]}"}
    return json.loads(out.read_text())


def measure_scaling(job_file: Path, job: dict, key: str) -> dict:
    """tunelab full fine-tuning on one scaled training file: seconds per 1,000 rows."""
    out = Path(job["workdir"]) / f"result-{key}.json"
    child = common.run_child([sys.executable, str(Path(__file__).resolve()), "--child",
                              str(job_file), f"full:{key}", str(out)],
                             env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                  "PYTHONWARNINGS": "ignore"})
    rows = len(read_labeltext(Path(job["scaling"][key]))) * job["epochs"]
    row = {"multiple": key.split("-")[1], "rows": rows,
           "peak_rss_mb": round(child.peak_rss_mb, 1)}
    if child.returncode != 0 or not out.is_file():
        return {**row, "error": f"exit code {child.returncode}: {child.output_tail[-2000:]}"}
    result = json.loads(out.read_text())
    return {**row, "train_seconds": result["train_seconds"],
            "seconds_per_1000_rows": round(1000 * result["train_seconds"] / rows, 2),
            "test_accuracy": result["test_accuracy"]}


def median_run(runs: list[dict]) -> dict:
    """The run with the median training time (the slower middle one of an even number), with
    every run's time beside it; a failed run fails the row."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["train_seconds"])
    return {**ordered[len(ordered) // 2],
            "train_seconds_runs": [round(r["train_seconds"], 2) for r in runs]}


def ratios(rows: list[dict]) -> dict:
    """tunelab against each Trainer configuration, per method: >1 = tunelab faster/larger."""
    found = {(r["method"], r["config"]): r for r in rows if "error" not in r}
    out = {}
    for method in METHODS:
        ours = found.get((method, "tunelab"))
        for config in (c for c in CONFIGS if c != "tunelab"):
            theirs = found.get((method, config))
            if ours and theirs:
                out[f"{method}: tunelab vs {config}"] = {
                    "speed": round(ours["samples_per_s"] / theirs["samples_per_s"], 2),
                    "peak_rss": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 2),
                    "accuracy_points": round(100 * (ours["test_accuracy"]
                                                    - theirs["test_accuracy"]), 2)}
    return out


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["## Training throughput: tunelab vs transformers.Trainer (SST-2, MiniLM)", "",
             f"`{report['command']}`", "",
             f"{report['date']}; {common.machine_line(report['machine'])}.", "",
             f"{s['train_rows']} training rows × {s['epochs']} epoch(s), batch {BATCH_SIZE}, "
             f"max length {MAX_LENGTH}, warm-up {WARMUP_RATIO:.0%} + linear decay, weight decay "
             f"{WEIGHT_DECAY}, seed {SEED}; lr {s['lr']['full']:g} (full), "
             f"{s['lr']['lora']:g} (LoRA r=8, all attention + feed-forward layers). "
             f"Real tokens per epoch: {s['real_tokens_per_epoch']:,} "
             f"({s['real_tokens_per_epoch'] / s['padded_tokens_per_epoch']:.0%} of padding to "
             f"{MAX_LENGTH}). Seconds count training steps only; tokens/s counts real tokens; "
             f"peak RSS is the whole child process; accuracy on the SST-2 test set "
             f"({s['test_rows']} rows).", ""]
    headers = ["method", "configuration", "precision", "train s (median)", "runs (train s)",
               "samples/s", "real tokens/s", "peak RSS MB", "test acc", "tunelab speed ×",
               "tunelab RSS ×"]
    table = []
    for r in report["results"]:
        if "error" in r:
            table.append([r["method"], r["config"], "failed"] + ["—"] * 8)
            continue
        ratio = report["ratios"].get(f"{r['method']}: tunelab vs {r['config']}", {})
        table.append([r["method"], r["config"], r["precision"], common.fmt(r["train_seconds"]),
                      ", ".join(common.fmt(t) for t in r.get("train_seconds_runs", [])),
                      common.fmt(r["samples_per_s"]), common.fmt(r["tokens_per_s"], 0),
                      common.fmt(r["peak_rss_mb"], 0), f"{r['test_accuracy']:.4f}",
                      f"{ratio['speed']:.2f}" if ratio else "—",
                      f"{ratio['peak_rss']:.2f}" if ratio else "—"])
    lines += [common.markdown_table(headers, table), "",
              "tunelab speed × = tunelab samples/s ÷ that row's; tunelab RSS × = tunelab peak RSS "
              "÷ that row's (< 1: tunelab uses less). Each row is the run with the median "
              "training time of those listed (rounds over the configurations, so that drift "
              "meets all of them; Trainer's defaults run once); single runs drift ±10% on a "
              "shared machine, absolute figures ±25% between days."]
    peak = report.get("matmul_peak", {})
    if report.get("mfu") and "bf16_gflops" in peak:
        lines += ["", f"Fraction of the bf16 matmul peak: the encoder's six matmul shapes at "
                  f"{peak['rows']} rows (batch × mean length), forward- and backward-shaped, ran "
                  f"at **{peak['bf16_gflops']:,.0f} GFLOP/s** in this run. Model FLOPs per real "
                  f"token count 2 per weight forward, 2 for input gradients, 2 for weight "
                  f"gradients (full only) and attention; embeddings and the head excluded.", "",
                  common.markdown_table(
                      ["method", "MFLOP / real token", "achieved GFLOP/s", "fraction of peak",
                       "1.5x the tuned Trainer would take"],
                      [[m, v["mflop_per_token"], v["achieved_gflops"],
                        f"{v['fraction_of_peak']:.0%}", f"{v['fraction_for_1_5x_tuned']:.0%}"
                        if "fraction_for_1_5x_tuned" in v else "—"]
                       for m, v in report["mfu"].items()])]
    if report.get("scaling"):
        base = next((r for r in report["scaling"] if "error" not in r), None)
        lines += ["", "Scaling with rows (tunelab full fine-tuning, same settings):", "",
                  common.markdown_table(
                      ["rows", "train s", "s per 1,000 rows", "vs smallest", "peak RSS MB",
                       "test acc"],
                      [[f"{r['rows']:,} ({r['multiple']})", common.fmt(r["train_seconds"]),
                        r["seconds_per_1000_rows"],
                        f"{r['seconds_per_1000_rows'] / base['seconds_per_1000_rows']:.2f}",
                        common.fmt(r["peak_rss_mb"], 0), f"{r['test_accuracy']:.4f}"]
                       if "error" not in r else [r["rows"], "failed", "—", "—", "—", "—"]
                       for r in report["scaling"]])]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0
    from tunelab.methods import registry

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        workdir = Path(tmp)
        data = prepare_data(args, workdir)
        lr = {m: registry.get_method(m).default_lr for m in METHODS}
        job = {**data, "epochs": args.epochs, "lr": lr, "workdir": str(workdir),
               "shapes": model_shapes(), "scaling": scaling_files(args, data, workdir)}
        job_file = workdir / "job.json"
        job_file.write_text(json.dumps(job))
        rows = []
        for method in args.methods:
            runs = {config: [] for config in args.configs}
            for round_ in range(args.repeats):  # rounds, so that drift meets every config
                for config in args.configs:
                    if round_ and config == "trainer_default":
                        continue
                    print(f"[{NAME}] {method} / {config} (run {round_ + 1}) ...",
                          file=sys.stderr, flush=True)
                    runs[config].append(measure(job_file, job, method, config))
                    print(f"[{NAME}] {summary(runs[config][-1])}", file=sys.stderr, flush=True)
            rows += [median_run(runs[config]) for config in args.configs]
        peak = probe(job_file, job)
        scaling = [measure_scaling(job_file, job, key) for key in job["scaling"]]
    test_rows = len(read_labeltext(Path(data["paths"]["test"])))
    settings = {k: v for k, v in data.items() if k != "paths"}
    report = {"benchmark": NAME, "command": common.command_line(), "date": common.now(),
              "machine": common.machine_info(),
              "settings": {**settings, "epochs": args.epochs, "lr": lr, "test_rows": test_rows,
                           "batch_size": BATCH_SIZE, "max_length": MAX_LENGTH,
                           "warmup_ratio": WARMUP_RATIO, "weight_decay": WEIGHT_DECAY,
                           "seed": SEED, "lora": LORA, "eval_batch_size": EVAL_BATCH_SIZE},
              "results": rows, "ratios": ratios(rows), "matmul_peak": peak,
              "mfu": mfu(rows, job, peak.get("bf16_gflops")), "scaling": scaling,
              "benchmark_seconds": round(time.perf_counter() - started, 1)}
    common.write_json(args.out, report)
    text = markdown(report)
    print(text)
    if args.markdown:
        common.update_markdown_section(args.markdown, NAME, text)
    print(f"\nwrote {args.out}" + (f" and {args.markdown}" if args.markdown else "")
          + f" in {report['benchmark_seconds']:.0f} s", file=sys.stderr)
    failed = [f"{r['method']}/{r['config']}" for r in rows if "error" in r]
    if failed:
        print(f"FAILED: {', '.join(failed)} (see 'error' in {args.out})", file=sys.stderr)
    return 1 if failed else 0


def summary(row: dict) -> str:
    if "error" in row:
        return f"{row['method']} / {row['config']}: FAILED ({row['error'][:200]})"
    return (f"{row['method']} / {row['config']}: {row['train_seconds']:.1f} s, "
            f"{row['samples_per_s']:.1f} samples/s, {row['tokens_per_s']:.0f} tokens/s, "
            f"peak RSS {row['peak_rss_mb']:.0f} MB, test acc {row['test_accuracy']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
