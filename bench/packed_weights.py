"""What laying frozen weights out for oneDNN once (`tunelab.train.frozen.packed_weights`) buys,
measured in one process with both paths interleaved (the machine drifts between processes):

1. MiniLM's 36 linear layers (random bf16 weights), forward plus input gradient, at three token
   counts: torch's `addmm`/`mm` (which re-lays out the weight at every call) vs the packed path.
2. Prediction: MiniLM on the first 640 SST-2 test sentences, `Predictor` with and without
   `keep_weights_cast` (what `tunelab.load(run, precision="bf16")` does): sentences/s, and
   whether the logits are identical.
3. A LoRA training step (`configs/minilm/sst2_lora.yaml`): every step's micro-batch runs with
   packing off and on, back to back, in alternating order; the median of the per-step ratios.
   The same for grouping each layer's query, key and value projections into one matmul
   (`tunelab.train.grouped`).
4. Generation with SmolLM2-135M-Instruct in bf16 (when its package is installed, see
   README): `Generator.from_pretrained` with and without `keep_weights_cast`, greedy, the same
   prompts: seconds, new tokens/s, whether the texts are identical.
Parts 2 and 4 compare the layouts with the layer plans off; then, on the laid-out models, each
layer module by module against one plain function (`tunelab.train.layer_plan`,
`tunelab.train.decoder_plan`): sentences/s, one short sentence p50, new tokens/s.

    .venv/bin/python bench/packed_weights.py           # ~3 minutes
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "packed_weights"
SHAPES = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]  # one MiniLM layer: q, k, v, o, in, out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, NAME)
    parser.add_argument("--tokens", default="832,1280,2080", help="token counts of part 1")
    parser.add_argument("--sentences", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=6, help="prediction rounds per path")
    parser.add_argument("--steps", type=int, default=40, help="paired LoRA steps")
    return parser.parse_args(argv)


def layer_matmuls(tokens: int, repeats: int = 15) -> dict:
    """Milliseconds for forward + input gradient of 6 layers x 6 linear layers, each path."""
    import torch

    from tunelab.train.frozen import PackedWeight, linear_packed

    torch.manual_seed(0)
    layers = [torch.randn(o, i, dtype=torch.bfloat16) for o, i in SHAPES * 6]
    biases = [torch.randn(w.shape[0], dtype=torch.bfloat16) for w in layers]
    packed = [PackedWeight(w, dtype=torch.bfloat16) for w in layers]
    for p in packed:
        p.transposed()
    xs = {n: torch.randn(tokens, n, dtype=torch.bfloat16) for n in (384, 1536)}

    def plain():
        for w, b in zip(layers, biases):
            torch.addmm(b, xs[w.shape[1]], w.t())
            torch.mm(xs[w.shape[0]], w)

    def laid_out():
        for w, b, p in zip(layers, biases, packed):
            linear_packed(xs[w.shape[1]], p.matrix, b)
            linear_packed(xs[w.shape[0]], p.transposed())

    times = {"plain": [], "packed": []}
    for _ in range(3):
        plain(), laid_out()
    for r in range(repeats):
        for name, f in (("plain", plain), ("packed", laid_out))[::1 if r % 2 else -1]:
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {"tokens": tokens, **ms, "saved": 1 - ms["packed"] / ms["plain"]}


def prediction(args) -> dict:
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.models import resolve_model
    from tunelab.predict import Predictor, keep_weights_cast

    path = resolve_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    lines = (args.data_dir / "sst2" / "test.txt").read_text().splitlines()[:args.sentences]
    texts = [line.split(" ", 1)[1] for line in lines]
    plain = Predictor(model, tokenizer, ["negative", "positive"], 128, bf16=True)
    kept = Predictor(keep_weights_cast(copy.deepcopy(model)), tokenizer,
                     ["negative", "positive"], 128, bf16=True)
    plans = planned(kept.model)
    use_plans(plans, False)
    identical = bool(torch.equal(plain.logits(texts), kept.logits(texts)))
    times = {"plain": [], "packed": []}
    for r in range(args.rounds):
        for name, p in (("plain", plain), ("packed", kept))[::1 if r % 2 else -1]:
            t0 = time.perf_counter()
            p.logits(texts)
            times[name].append(time.perf_counter() - t0)
    rate = {k: len(texts) / statistics.median(v) for k, v in times.items()}
    # the layer plans, on the laid-out model: whole list and one short sentence at a time
    apart = kept.logits(texts)
    use_plans(plans, True)
    short = [t for t in texts if len(t.split()) <= 10][:100]
    per_s, single = {False: [], True: []}, {False: [], True: []}
    for r in range(args.rounds):
        for on in (False, True)[::1 if r % 2 else -1]:
            use_plans(plans, on)
            t0 = time.perf_counter()
            kept.logits(texts)
            per_s[on].append(len(texts) / (time.perf_counter() - t0))
            for text in short:
                t0 = time.perf_counter()
                kept.predict([text])
                single[on].append(1000 * (time.perf_counter() - t0))
    return {"sentences": len(texts), "plain_per_s": rate["plain"],
            "packed_per_s": rate["packed"], "identical_logits": identical,
            "plans": {"layers": len(plans), "identical_logits":
                      bool(torch.equal(apart, kept.logits(texts))),
                      "off_per_s": statistics.median(per_s[False]),
                      "on_per_s": statistics.median(per_s[True]), "short": len(short),
                      "off_short_ms": statistics.median(single[False]),
                      "on_short_ms": statistics.median(single[True])}}


def planned(model) -> list:
    """(layer, its plan) for each layer of `model` with a layer plan."""
    from tunelab.train.decoder_plan import _PlannedDecoder
    from tunelab.train.layer_plan import _Planned

    return [(m, m.__dict__["_plan"]) for m in model.modules()
            if isinstance(m, (_Planned, _PlannedDecoder)) and "_plan" in m.__dict__]


def use_plans(plans: list, on: bool) -> None:
    for layer, plan in plans:
        if on:
            layer.__dict__["_plan"] = plan
        else:
            layer.__dict__.pop("_plan", None)


def lora_steps(args, module, flag: str) -> dict:
    """LoRA steps with `module.<flag>` off and on for each step's micro-batches, back to back,
    in alternating order: the median per-step times and ratio."""
    from tunelab.train import loop

    times = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        config = common.sst2_steps_config(args.data_dir, "lora", 3000, args.steps + 5,
                                          Path(tmp) / "run")
        step = loop.optimizer_step

        def paired(*a, **k):  # the same micro-batches twice, the path off and on
            n = len(times[False]) + len(times[True])
            order = (False, True) if n % 4 == 0 else (True, False)
            for on in order:
                setattr(module, flag, on)
                t0 = time.perf_counter()
                result = step(*a, **k)
                times[on].append(time.perf_counter() - t0)
            return result

        loop.optimizer_step = paired
        try:
            loop.train(config, quiet=True)
        finally:
            loop.optimizer_step = step
            setattr(module, flag, True)
    off, on = times[False][5:], times[True][5:]  # warm-up steps left out
    ratios = [b / a for a, b in zip(off, on)]
    return {"steps": len(ratios), "off_ms": 1000 * statistics.median(off),
            "on_ms": 1000 * statistics.median(on), "median_ratio": statistics.median(ratios)}


def generation(args) -> dict | None:
    from tunelab import predict
    from tunelab.errors import TunelabError
    from tunelab.generate import Generator

    prompts = ["Write a haiku about autumn.", "What is the capital of France?",
               "Give three tips for learning Python.",
               "Explain what a neural network is in one sentence."]
    try:
        kept = Generator.from_pretrained("smollm2", precision="bf16", max_new_tokens=48,
                                         batch_size=len(prompts))
    except TunelabError as e:  # the optional model package is not installed
        print(f"[{NAME}] generation skipped: {e}", file=sys.stderr)
        return None
    keep = predict.keep_weights_cast
    predict.keep_weights_cast = lambda model: model
    try:
        plain = Generator.from_pretrained("smollm2", precision="bf16", max_new_tokens=48,
                                          batch_size=len(prompts))
    finally:
        predict.keep_weights_cast = keep
    plans = planned(kept.model)
    use_plans(plans, False)
    texts = {"plain": [g.text for g in plain.generate(prompts)],
             "packed": [g.text for g in kept.generate(prompts)]}
    times = {"plain": [], "packed": []}
    for r in range(args.rounds // 2 or 1):
        for name, g in (("plain", plain), ("packed", kept))[::1 if r % 2 else -1]:
            t0 = time.perf_counter()
            g.generate(prompts)
            times[name].append(time.perf_counter() - t0)
    planned_times = {False: [], True: []}
    for r in range(args.rounds // 2 or 1):  # the layer plans, on the laid-out model
        for on in (False, True)[::1 if r % 2 else -1]:
            use_plans(plans, on)
            t0 = time.perf_counter()
            out = [g.text for g in kept.generate(prompts)]
            planned_times[on].append(time.perf_counter() - t0)
    tokens = sum(len(plain.tokenizer(t)["input_ids"]) for t in texts["plain"])
    seconds = {k: statistics.median(v) for k, v in times.items()}
    return {"prompts": len(prompts), "new_tokens": tokens, "plain_s": seconds["plain"],
            "packed_s": seconds["packed"], "identical_texts": texts["plain"] == texts["packed"],
            "plans": {"layers": len(plans), "identical_texts": out == texts["packed"],
                      "off_s": statistics.median(planned_times[False]),
                      "on_s": statistics.median(planned_times[True])}}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from tunelab.train.frozen import _can_pack

    if not _can_pack():
        print(f"[{NAME}] this torch build has no packed oneDNN linear: nothing to measure",
              file=sys.stderr)
        return 1
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # one per usable core, as tunelab
    started = time.perf_counter()
    print(f"[{NAME}] layer matmuls ...", flush=True)
    layers = [layer_matmuls(int(n)) for n in args.tokens.split(",")]
    print(f"[{NAME}] prediction ...", flush=True)
    predicted = prediction(args)
    print(f"[{NAME}] generation ...", flush=True)
    generated = generation(args)  # before training changes malloc's settings for the process
    from tunelab.train import frozen, grouped

    print(f"[{NAME}] LoRA steps, packing off/on ...", flush=True)
    grouped.GROUP = False  # packing alone (groups compute with packed weights only)
    steps = lora_steps(args, frozen, "PACK_WEIGHTS")
    grouped.GROUP = True
    print(f"[{NAME}] LoRA steps, projections grouped off/on ...", flush=True)
    grouped_steps = lora_steps(args, grouped, "GROUP")
    report = {"command": common.command_line(), "date": common.now(),
              "machine": common.machine_info(), "layers": layers, "prediction": predicted,
              "lora_steps": steps, "grouped_steps": grouped_steps, "generation": generated,
              "rounds": args.rounds,
              "seconds": round(time.perf_counter() - started, 1)}
    common.publish(args, NAME, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    rows = [[f"MiniLM's 36 linear layers, forward + input gradient, {r['tokens']:,} tokens "
             "(ms)", common.fmt(r["plain"]), common.fmt(r["packed"]),
             f"{100 * r['saved']:.1f}% less time"] for r in report["layers"]]
    p, s = report["prediction"], report["lora_steps"]
    rows.append([f"prediction, {p['sentences']} SST-2 sentences (sentences/s)",
                 common.fmt(p["plain_per_s"]), common.fmt(p["packed_per_s"]),
                 f"{p['packed_per_s'] / p['plain_per_s']:.3f}x; logits "
                 + ("identical" if p["identical_logits"] else "DIFFERENT")])
    rows.append([f"LoRA training step, median of {s['steps']} paired steps (ms)",
                 common.fmt(s["off_ms"]), common.fmt(s["on_ms"]),
                 f"step ratio {s['median_ratio']:.3f}"])
    gen = report.get("generation")
    if gen:
        rows.append([f"SmolLM2-135M generation, {gen['prompts']} prompts x 48 new tokens, "
                     "greedy (new tokens/s)", common.fmt(gen["new_tokens"] / gen["plain_s"]),
                     common.fmt(gen["new_tokens"] / gen["packed_s"]),
                     f"{gen['plain_s'] / gen['packed_s']:.2f}x; texts "
                     + ("identical" if gen["identical_texts"] else "DIFFERENT")])
    g = report["grouped_steps"]
    plan_rows = [[f"prediction, {p['sentences']} SST-2 sentences (sentences/s)",
                  common.fmt(p["plans"]["off_per_s"]), common.fmt(p["plans"]["on_per_s"]),
                  f"{p['plans']['on_per_s'] / p['plans']['off_per_s']:.3f}x; logits "
                  + ("identical" if p["plans"]["identical_logits"] else "DIFFERENT")],
                 [f"one short sentence, p50 of {p['plans']['short']} x {report['rounds']} (ms)",
                  common.fmt(p["plans"]["off_short_ms"], 2),
                  common.fmt(p["plans"]["on_short_ms"], 2),
                  f"{p['plans']['on_short_ms'] / p['plans']['off_short_ms']:.2f}x the time"]]
    if gen:
        gp = gen["plans"]
        plan_rows.append([f"SmolLM2-135M generation, {gen['prompts']} prompts x 48 new tokens, "
                          "greedy (new tokens/s)", common.fmt(gen["new_tokens"] / gp["off_s"]),
                          common.fmt(gen["new_tokens"] / gp["on_s"]),
                          f"{gp['off_s'] / gp['on_s']:.2f}x; texts "
                          + ("identical" if gp["identical_texts"] else "DIFFERENT")])
    return "\n\n".join([
        "## Frozen weights laid out for oneDNN once (bf16, CPU)",
        f"`{report['command']}`",
        f"{report['date']}; {common.machine_line(report['machine'])}; {report['seconds']:.0f} s",
        "torch's bf16 matmul hands oneDNN the plain weight, re-laid out at every call; "
        "`tunelab.train.frozen.packed_weights` lays a frozen weight out once (as W and W^T). "
        "Both paths in one process, interleaved.",
        common.markdown_table(["", "plain (autocast)", "laid out once", ""], rows),
        "With the layouts, `tunelab.train.grouped` computes a layer's frozen query, key and "
        "value projections as one matmul against their weights stacked (and backward, one "
        "matmul for the input gradient where there were three and two sums):",
        common.markdown_table(["", "each layer alone", "grouped", ""], [[
            f"LoRA training step, median of {g['steps']} paired steps (ms)",
            common.fmt(g["off_ms"]), common.fmt(g["on_ms"]),
            f"step ratio {g['median_ratio']:.3f}"]]),
        "On the laid-out models, each encoder layer (MiniLM) and decoder layer (SmolLM2) "
        "module by module against one plain function over its prepared parts "
        "(`tunelab.train.layer_plan`, `tunelab.train.decoder_plan`), interleaved:",
        common.markdown_table(["", "module by module", "one function", ""], plan_rows)])


if __name__ == "__main__":
    sys.exit(main())
