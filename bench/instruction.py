"""Instruction tuning: SmolLM2-135M-Instruct before and after LoRA on the Alpaca demo set.

Trains configs/smollm2/alpaca_lora.yaml (LoRA r=8 on every linear layer, loss on responses +
eos) and compares the base model with the tuned one on the same held-out conversations (10%
of alpaca_en_demo.json, seed 42, rendered with SmolLM2's chat template):

- loss and perplexity per response token (eos included), next-token accuracy;
- on the first N held-out prompts (greedy, max_new_tokens): the share of generations that stop
  at eos before the limit, mean generated tokens, generation tokens/s, two example replies;
- training seconds (steps only), real tokens/s, peak RSS of the training process.

Base and tuned model each run in their own child process (peak RSS is the child's own).

    .venv/bin/python bench/instruction.py                      # full size (~14 min, idle 2-core CPU)
    .venv/bin/python bench/instruction.py --train-rows 8 --max-steps 2 --validation-ratio 0.01 \\
        --prompts 2 --max-new-tokens 8 --markdown /tmp/instruction.md      # smoke (a few min)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "instruction"
SECTION = "instruction_smollm2"
RECIPE = common.REPO_ROOT / "configs" / "smollm2" / "alpaca_lora.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, NAME)
    parser.add_argument("--recipe", type=Path, default=RECIPE, help=f"default: {RECIPE.name}")
    parser.add_argument("--train-rows", type=int, default=None,
                        help="data.max_train_rows (default: the recipe's)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="train.max_steps (default: the recipe's epochs)")
    parser.add_argument("--validation-ratio", type=float, default=None,
                        help="data.validation_ratio (default: the recipe's)")
    parser.add_argument("--prompts", type=int, default=20, help="held-out prompts to generate for")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--child", nargs=3, metavar=("JOB_JSON", "KIND", "OUT_JSON"),
                        help=argparse.SUPPRESS)  # internal: measure the base or the tuned model
    return parser.parse_args(argv)


def limits(args) -> list[str]:
    """The overrides that shrink the recipe (a smoke run), as shown in the report."""
    chosen = (("data.max_train_rows", args.train_rows), ("train.max_steps", args.max_steps),
              ("data.validation_ratio", args.validation_ratio))
    return [f"{key}={value}" for key, value in chosen if value is not None]


def overrides(args, workdir: Path) -> list[str]:
    data = args.data_dir / "instructions" / "alpaca_en_demo.json"
    if not data.is_file():
        raise SystemExit(f"{data} is missing (set --data-dir)")
    return [f"data.train={data}", "train.tracker=none", f"run_dir={workdir / 'run'}",
            *limits(args)]


# --------------------------------------------------------------------------------------------
# children


def child_main(job_file: str, kind: str, out_file: str) -> None:
    from tunelab.config import resolve_config
    from tunelab.tasks import get_task

    job = json.loads(Path(job_file).read_text())
    config = resolve_config(job["recipe"], job["overrides"])
    held_out = get_task(config).load_data().splits["validation"]
    if kind == "base":
        from tunelab.generate import Generator

        generator = Generator.from_pretrained(config.model.name,
                                              template=config.task.settings.template,
                                              max_length=config.model.max_length,
                                              precision=config.train.precision,
                                              batch_size=config.train.eval_batch_size)
        metrics, _, dropped = generator.evaluate(held_out)
        result = {"eval": metrics, "eval_dropped": len(dropped)}
    else:
        import tunelab
        from tunelab.train.loop import train

        run_dir = train(config, quiet=True)
        results = json.loads((run_dir / "results.json").read_text())
        generator = tunelab.load(run_dir, batch_size=config.train.eval_batch_size)
        result = {"eval": results["validation"], "train": results["train"]}
    result["generation"] = generate(generator, held_out[:job["prompts"]],
                                    job["max_new_tokens"])
    common.write_json(Path(out_file), result)


def generate(generator, conversations, max_new_tokens: int) -> dict:
    prompts = [c.messages[:-1] for c in conversations]
    t0 = time.perf_counter()
    outputs = generator.generate(prompts, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - t0
    new_tokens = sum(o.new_tokens for o in outputs)
    return {"prompts": len(outputs), "stopped_at_eos": sum(o.finished for o in outputs),
            "stop_share": sum(o.finished for o in outputs) / max(len(outputs), 1),
            "mean_new_tokens": new_tokens / max(len(outputs), 1), "seconds": round(seconds, 2),
            "tokens_per_s": new_tokens / max(seconds, 1e-9),
            "replies": [{"prompt": c.messages[-2]["content"],
                         "reference": c.messages[-1]["content"], "text": o.text, "finished": o.finished, "new_tokens": o.new_tokens}
                        for c, o in zip(conversations, outputs)]}


def measure(job_file: Path, workdir: Path, kind: str) -> dict:
    out = workdir / f"{kind}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(job_file), kind,
            str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    child = common.run_child(argv, env=env)
    if child.returncode != 0 or not out.is_file():
        raise SystemExit(f"{kind} failed (exit code {child.returncode}):\n"
                         f"{child.output_tail[-3000:]}")
    return {**json.loads(out.read_text()), "peak_rss_mb": round(child.peak_rss_mb, 1),
            "process_seconds": round(child.wall_seconds, 1)}


# --------------------------------------------------------------------------------------------
# report


def markdown(report: dict) -> str:
    s, base, tuned = report["settings"], report["base"], report["tuned"]
    t = tuned["train"]
    lines = ["## Instruction tuning: SmolLM2-135M-Instruct + LoRA on Alpaca (English demo)", "",
             f"`{report['command']}`", "",
             f"{report['date']}; {common.machine_line(report['machine'])}.", "",
             f"Recipe `{s['recipe']}` ({' '.join(s['limits']) or 'as written'}): "
             f"{t['steps']} steps, {t['samples']:,} response tokens trained on, precision "
             f"{t['precision']}. Held out: {s['held_out']} conversations. Generation: greedy, "
             f"at most {s['max_new_tokens']} new tokens, first {s['prompts']} held-out prompts.",
             ""]
    headers = ["model", "eval loss", "perplexity", "token acc", "stop at eos",
               "mean new tokens", "gen tokens/s", "peak RSS MB"]
    rows = []
    for name, r in (("base", base), ("LoRA-tuned", tuned)):
        g = r["generation"]
        rows.append([name, f"{r['eval']['loss']:.4f}", f"{r['eval']['perplexity']:.3f}",
                     f"{r['eval']['accuracy']:.4f}", f"{g['stopped_at_eos']}/{g['prompts']}",
                     common.fmt(g["mean_new_tokens"]), common.fmt(g["tokens_per_s"]),
                     common.fmt(r["peak_rss_mb"], 0)])
    lines += [common.markdown_table(headers, rows), "",
              f"Training: {t['seconds']:.0f} s for the steps, {t['tokens_per_s']:.0f} real "
              f"tokens/s, {t['trainable_params']:,} of {t['total_params']:,} parameters train; "
              f"peak RSS of the training process {tuned['peak_rss_mb']:,.0f} MB (it also "
              f"evaluates and generates).", ""]
    for i, (b, u) in enumerate(zip(base["generation"]["replies"][:2],
                                   tuned["generation"]["replies"][:2]), start=1):
        lines += [f"Example {i}: *{_quote(b['prompt'], 200)}*", "",
                  f"- base ({b['new_tokens']} tokens, {'stopped' if b['finished'] else 'cut'}): "
                  f"{_quote(b['text'])}",
                  f"- tuned ({u['new_tokens']} tokens, {'stopped' if u['finished'] else 'cut'}): "
                  f"{_quote(u['text'])}",
                  f"- reference: {_quote(b['reference'])}", ""]
    return "\n".join(lines)


def _quote(text: str, limit: int = 400) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        workdir = Path(tmp)
        job = {"recipe": str(args.recipe), "overrides": overrides(args, workdir),
               "prompts": args.prompts, "max_new_tokens": args.max_new_tokens}
        job_file = workdir / "job.json"
        job_file.write_text(json.dumps(job))
        results = {}
        for kind in ("base", "tuned"):
            print(f"[{NAME}] {kind} ...", file=sys.stderr, flush=True)
            results[kind] = measure(job_file, workdir, kind)
        held_out = json.loads((workdir / "run" / "preflight.json").read_text())
    report = {"benchmark": NAME, "command": common.command_line(), "date": common.now(),
              "machine": common.machine_info(),
              "settings": {"recipe": str(args.recipe.relative_to(common.REPO_ROOT)
                                         if args.recipe.is_relative_to(common.REPO_ROOT)
                                         else args.recipe),
                           "limits": limits(args), "prompts": args.prompts,
                           "max_new_tokens": args.max_new_tokens,
                           "held_out": held_out["splits"]["validation"]["rows"]},
              **results, "benchmark_seconds": round(time.perf_counter() - started, 1)}
    common.write_json(args.out, report)
    text = markdown(report)
    print(text)
    if args.markdown:
        common.update_markdown_section(args.markdown, SECTION, text)
    print(f"\nwrote {args.out}" + (f" and {args.markdown}" if args.markdown else "")
          + f" in {report['benchmark_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
