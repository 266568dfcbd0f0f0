"""Where a training step's time goes: `tunelab train` on SST-2 with MiniLM, profiled with
torch.profiler over steps in the middle of the run, each op's own time put in a category.

    .venv/bin/python bench/step_profile.py                    # full and LoRA (what the docs show)
    .venv/bin/python bench/step_profile.py --methods lora --steps 20 --markdown ''

The matmul rate inside the step (the profiler's FLOP count of mm/addmm/bmm over their time) is
set beside the bf16 rate the same shapes reach alone (bench/mfu.py's probe), so what is left to
gain outside the matmuls can be read off: the share of the step that is not matmul.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "step_profile"
PACKED = "mkldnn::_linear_pointwise"
"""A matmul with a weight laid out in advance (tunelab.train.frozen); the profiler counts no
FLOPs for it, so they are taken from its shapes."""
WARMUP_STEPS = 10
CATEGORIES = [  # (category, ops whose self time it counts); the rest is "other"
    ("matmul", {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", PACKED}),
    ("dtype casts and copies", {"aten::copy_", "aten::_to_copy"}),
    ("optimizer (fused AdamW)", {"aten::_fused_adamw_"}),
    ("GELU", {"aten::gelu", "aten::gelu_backward"}),
    ("dropout masks (torch's part)", {"aten::random_", "aten::ge"}),
    ("softmax", {"aten::_softmax", "aten::_softmax_backward_data"}),
    ("layer norm", {"aten::native_layer_norm", "aten::native_layer_norm_backward"}),
    ("gradient norm (clipping)", {"aten::linalg_vector_norm"}),
    ("element-wise mul/add", {"aten::mul", "aten::mul_", "aten::add", "aten::add_"}),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, NAME)
    parser.add_argument("--methods", default="full,lora", help="comma-separated (full, lora)")
    parser.add_argument("--steps", type=int, default=30, help="steps profiled (after 10 more)")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # METHOD:OUT.json, one profile
    return parser.parse_args(argv)


def profile_child(args) -> None:
    """Train in this process and profile steps WARMUP_STEPS+1 .. WARMUP_STEPS+steps; the
    profiler is switched on and off around `optimizer_step`, the loop's one step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tunelab.train import loop

    method, out = args.child.split(":", 1)
    steps = args.steps
    config = common.sst2_steps_config(args.data_dir, method, args.train_rows,
                                      WARMUP_STEPS + steps, Path(out).parent / f"run-{method}")
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True)
    step = loop.optimizer_step
    seconds, tokens = [], []

    def profiled_step(*a, **k):
        n = len(seconds) + 1
        if n == WARMUP_STEPS + 1:
            prof.__enter__()
        t0 = time.perf_counter()
        result = step(*a, **k)
        seconds.append(time.perf_counter() - t0)
        tokens.append(result[2])  # (loss sum, items, real tokens)
        if n == WARMUP_STEPS + steps:
            prof.__exit__(None, None, None)
        return result

    loop.optimizer_step = profiled_step
    loop.train(config, quiet=True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {name: 0.0 for name, _ in CATEGORIES}
    shares["other"] = 0.0
    matmul_us = matmul_flops = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        name = next((c for c, ops in CATEGORIES if e.key in ops), "other")
        shares[name] += e.self_cpu_time_total
        if name == "matmul":
            matmul_us += e.self_cpu_time_total
            matmul_flops += packed_flops(e) if e.key == PACKED else e.flops or 0
    profiled = seconds[WARMUP_STEPS:]
    common.write_json(Path(out), {
        "method": method, "steps": len(profiled), "threads": torch.get_num_threads(),
        "step_ms": 1000 * sum(profiled) / len(profiled),
        "tokens_per_step": sum(tokens[WARMUP_STEPS:]) / len(profiled),
        "shares": {k: v / total for k, v in shares.items()},
        "matmul_gflops": matmul_flops / matmul_us / 1e3 if matmul_us else None})


def packed_flops(event) -> int:
    """2 x rows x in x out for `_linear_pointwise(x [.., in], W [out, in], ...)`, all calls."""
    x, w = event.input_shapes[0], event.input_shapes[1]
    rows = 1
    for n in x[:-1]:
        rows *= n
    return 2 * rows * x[-1] * w[0] * event.count


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        profile_child(args)
        return 0
    from mfu import model_shapes, probe_matmul_peak

    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = Path(tmp) / f"{method}.json"
            print(f"[{NAME}] {method} ...", flush=True)
            child = subprocess.run([sys.executable, __file__, "--child", f"{method}:{out}",
                                    "--data-dir", str(args.data_dir), "--steps", str(args.steps),
                                    "--train-rows", str(args.train_rows)],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                print(child.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(out.read_text()))
    # the probe's rows: the real tokens of a profiled step (batch 32 x mean length)
    tokens = sum(r["tokens_per_step"] for r in results) / len(results)
    probe = probe_matmul_peak({"shapes": model_shapes(), "real_tokens_per_epoch": tokens,
                               "train_rows": 32}, batch_size=32)
    info = common.machine_info()
    report = {"command": common.command_line(), "date": common.now(), "machine": info,
              "probe": probe, "results": results,
              "seconds": round(time.perf_counter() - started, 1)}
    common.publish(args, NAME, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    results = report["results"]
    names = [c for c, _ in CATEGORIES] + ["other"]
    rows = [[name, *(f"{100 * r['shares'][name]:.1f}%" for r in results)] for name in names]
    rows.append(["**step (ms)**", *(common.fmt(r["step_ms"]) for r in results)])
    rows.append(["matmul GFLOP/s in the step",
                 *(common.fmt(r["matmul_gflops"]) for r in results)])
    peak = report["probe"]["bf16_gflops"]
    rows.append(["... as a fraction of the probe",
                 *(f"{100 * r['matmul_gflops'] / peak:.0f}%" if r["matmul_gflops"] else "—"
                   for r in results)])
    return "\n\n".join([
        "## Where a training step's time goes (SST-2, MiniLM, bf16)",
        f"`{report['command']}`",
        f"{report['date']}; {common.machine_line(report['machine'])}",
        f"Self time of each op over {results[0]['steps']} steps after {WARMUP_STEPS}, "
        "torch.profiler, batch 32, length-grouped; the matmul rate alone at the encoder's "
        f"shapes (bench/mfu.py's probe, {report['probe']['rows']} rows) was "
        f"**{peak} GFLOP/s** in this run. The profiler's own cost is in the step times. "
        "Shares are of the time inside torch ops: the dropout masks' random draws (numpy) and "
        "Python are outside them; matmul counts oneDNN's linear with weights laid out in "
        "advance (LoRA's frozen layers) beside mm/addmm/bmm.",
        common.markdown_table(["share of the step", *(r["method"] for r in results)], rows)])


if __name__ == "__main__":
    sys.exit(main())
