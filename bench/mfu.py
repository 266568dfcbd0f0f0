"""What the machine can do for bench/train_throughput.py: the bf16 matmul rate at MiniLM's own
shapes, probed in the same run as the training rows, and the model FLOPs per real token that
turn a training row's tokens/s into a fraction of that rate."""
from __future__ import annotations

import time


def model_shapes() -> dict:
    from transformers import AutoConfig

    from tunelab.models import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model("minilm"))
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size}


def probe_matmul_peak(job: dict, batch_size: int) -> dict:
    """bf16 GFLOP/s of the encoder layer's matmuls (Q, K, V, O projections and the two
    feed-forward ones) at the benchmark's mean batch: M = batch x mean real length rows, run
    forward-shaped (X W) and backward-shaped (dY W^T, X^T dY). This is the peak training can
    reach with these shapes on this machine, measured in the same run as the training rows."""
    import torch

    d, f = job["shapes"]["hidden"], job["shapes"]["intermediate"]
    m = batch_size * round(job["real_tokens_per_epoch"] / job["train_rows"])
    shapes = [(m, d, d)] * 4 + [(m, d, f), (m, f, d)]
    gen = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    for mm, kk, nn in shapes:
        x = torch.randn(mm, kk, generator=gen).bfloat16()
        w = torch.randn(kk, nn, generator=gen).bfloat16()
        dy = torch.randn(mm, nn, generator=gen).bfloat16()
        ops = [lambda: x @ w, lambda: dy @ w.T, lambda: x.T @ dy]
        for op in ops:
            for _ in range(3):
                op()  # warm-up: oneDNN picks and caches its kernel
        t0 = time.perf_counter()
        repeats = 20
        for _ in range(repeats):
            for op in ops:
                op()
        seconds += time.perf_counter() - t0
        flops += repeats * 3 * 2 * mm * kk * nn
    return {"rows": m, "bf16_gflops": round(flops / seconds / 1e9, 1)}


def flops_per_token(shapes: dict, mean_length: float, method: str) -> float:
    """Training FLOPs per real token of the encoder (embeddings and head excluded): 2 per
    weight forward, 2 for the input gradient, 2 for the weight gradient — the last only where
    weights train (full; not the frozen backbone under LoRA, whose adapters are ~1% extra) —
    plus attention scores and mixing (4 x hidden x length per layer forward, x3 with backward)."""
    L, d, f = shapes["layers"], shapes["hidden"], shapes["intermediate"]
    weights = L * (4 * d * d + 2 * d * f)
    per_weight = 6 if method == "full" else 4
    return per_weight * weights + 12 * L * d * mean_length


def mfu(rows: list[dict], job: dict, peak_gflops: float | None) -> dict:
    """Fraction of the probed bf16 matmul peak that each tunelab row's training reaches, and
    the fraction 1.5x the tuned Trainer's tokens/s (the issue's target) would take."""
    if not peak_gflops:
        return {}
    mean_length = job["real_tokens_per_epoch"] / job["train_rows"]
    tuned = {r["method"]: r["tokens_per_s"] for r in rows
             if "error" not in r and r["config"] == "trainer_tuned"}
    out = {}
    for r in rows:
        if "error" in r or r["config"] != "tunelab":
            continue
        per_token = flops_per_token(job["shapes"], mean_length, r["method"])
        achieved = r["tokens_per_s"] * per_token / 1e9
        out[r["method"]] = {"mflop_per_token": round(per_token / 1e6, 1),
                            "achieved_gflops": round(achieved, 1),
                            "fraction_of_peak": round(achieved / peak_gflops, 3)}
        if r["method"] in tuned:
            need = 1.5 * tuned[r["method"]] * per_token / 1e9
            out[r["method"]]["fraction_for_1_5x_tuned"] = round(need / peak_gflops, 3)
    return out


def prediction_ceiling(tokenizer, texts: list[str], shapes: dict, batch_size: int) -> dict:
    """The most sentences/s prediction of `texts` could reach on this machine: the encoder's
    FLOPs per sentence (2 per weight and 4 x hidden x length per layer for attention, at the
    texts' own token counts, no padding) at the bf16 rate its four prediction matmuls reach in
    the layout prediction uses (`frozen.linear_packed`) at M = batch x mean length rows,
    probed here. Everything but those matmuls (attention's softmax, norms, activations,
    embeddings, tokenising, Python) is counted free, so no prediction path reaches it."""
    import torch

    from tunelab.train.frozen import laid_out, linear_packed

    lengths = [len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]]
    mean = sum(lengths) / len(lengths)
    L, d, f = shapes["layers"], shapes["hidden"], shapes["intermediate"]
    per_sentence = sum(2 * L * (4 * d * d + 2 * d * f) * n + 4 * L * d * n * n
                       for n in lengths) / len(lengths)
    m = round(batch_size * mean)
    gen = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    for k, n in [(d, 3 * d), (d, d), (d, f), (f, d)]:  # query/key/value stacked, as predicted
        x = torch.randn(m, k, generator=gen).bfloat16()
        w = laid_out(torch.randn(n, k, generator=gen), torch.bfloat16)
        b = torch.randn(n, generator=gen).bfloat16()
        for _ in range(3):
            linear_packed(x, w, b)  # warm-up: oneDNN picks and caches its kernel
        repeats = 30
        t0 = time.perf_counter()
        for _ in range(repeats):
            linear_packed(x, w, b)
        seconds += time.perf_counter() - t0
        flops += repeats * 2 * m * k * n
    peak = flops / seconds / 1e9
    return {"rows": m, "mean_tokens": round(mean, 2),
            "mflop_per_sentence": round(per_sentence / 1e6, 1),
            "bf16_gflops": round(peak, 1),
            "sentences_per_s": round(peak * 1e9 / per_sentence, 1)}
