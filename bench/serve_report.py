"""The markdown section bench/serve_latency.py writes to docs/benchmarks.md, from its result."""
from __future__ import annotations

import common

SHORT_WORDS = 10
"""A short sentence, for the single-sentence latency target: at most this many words (351 of
the 1,821 demo test sentences; the median sentence has 18)."""


SERVED_TITLES = {"fp32": "tunelab serve, run in fp32 (torch)",
                 "bf16": "tunelab serve, run in bf16 (torch autocast)",
                 "bf16_shared": "tunelab serve, run in bf16 beside another run on its base "
                                "(adapters kept apart)",
                 "onnx": "tunelab serve, onnx export (ONNX Runtime, fp32)",
                 "int8": "tunelab serve, int8 export (ONNX Runtime, int8 weights)"}
IN_PROCESS_TITLES = {"fp32": "tunelab.load(run, precision=\"fp32\") (torch)",
                     "bf16": "tunelab.load(run, precision=\"bf16\") (torch autocast)",
                     "bf16_unmerged": "tunelab.load(run, precision=\"bf16\", merge=False) "
                                      "(the adapter kept apart, as the server keeps "
                                      "runs that share a base)",
                     "onnx": "tunelab.load(onnx export) (ONNX Runtime, fp32)",
                     "int8": "tunelab.load(int8 export) (ONNX Runtime, int8 weights)"}


def served_title(key: str, r: dict) -> str:
    folded = r.get("served", {}).get("adapter_folded")
    return SERVED_TITLES[key] + (", adapter folded (alone on its base)" if folded else "")


def markdown(result: dict) -> str:
    rows = []
    base = result["pipeline"]
    for title, r in [("transformers.pipeline (in-process, no HTTP)", base),
                     *((served_title(key, r), r) for key, r in result["serve"].items())]:
        short = r.get("single_short")  # results written before it was measured lack it
        rows.append([title, common.fmt(short["p50_ms"]) if short else "—",
                     common.fmt(r["single"]["p50_ms"]), common.fmt(r["single"]["p99_ms"]),
                     common.fmt(r["throughput"], 0),
                     f"{r['throughput'] / base['throughput']:.2f}x", f"{r['agreement']:.2%}"])
    a = result["args"]
    mem = result["memory"]
    n = a["adapters"]
    return "\n\n".join([
        "## Serving latency and throughput (MiniLM, LoRA run)",
        f"`{result['command']}` — {result['date']}; {common.machine_line(result['machine'])}.",
        common.markdown_table(
            ["", f"1 short sentence p50 (ms, ≤ {SHORT_WORDS} words)", "1 sentence p50 (ms)",
             "p99 (ms)",
             f"sentences/s ({a['clients']} clients x {a['batch']}/request)", "vs pipeline",
             "agreement with the fp32 run"],
            rows),
        f"Single-sentence requests are sequential ({a['single']} over the demo test "
        f"sentences, then {a['single']} over those of at most {SHORT_WORDS} words); a request "
        "that finds the server idle runs at once (greedy batching), and only requests that "
        f"queue while a batch runs wait, up to --max-wait-ms {a['max_wait_ms']:g}, for more "
        "to batch with; a batch of mixed lengths is computed in length-sorted passes, cut "
        "where padding would cost more than another pass. "
        f"The pipeline gets its sentences as one list (batch_size {a['batch']}); the server "
        f"gets them as {a['clients']} concurrent HTTP clients (Python's http.client, one "
        "keep-alive connection each). The client shares the machine with the server. "
        f"Agreement: the share of {result['agreement_n']:,} demo test "
        "sentences (SST-2) given the label the run itself gives them in fp32 "
        "(`tunelab.load(run, precision=\"fp32\", merge=False)`: the model as it trained); the "
        "exports are made by `tunelab export` "
        "in the benchmark.",
        *in_process_markdown(result),
        common.markdown_table(
            ["memory (RSS, MB), fp32", "1 adapter", "2 adapters", f"{n} adapters",
             "per extra adapter"],
            [memory_row(mem, "serve", "loaded", n, "tunelab serve (one shared base), loaded"),
             memory_row(mem, "serve", "served", n, "... after one request per adapter"),
             memory_row(mem, "load", "loaded", n, f"{n} x tunelab.load in one process, loaded"),
             memory_row(mem, "load", "served", n, "... after one prediction each")]),
        f"The {n} adapters are copies of the run under different names. A run alone on its "
        "base is served with its adapter folded (its adapted layers' weights once more in "
        "fp32), so the extra adapter's cost counts from 2 adapters, where the server keeps "
        "them apart over the shared base; each tunelab.load holds its own merged model, laid "
        "out for the fp32 matmul at its first prediction. RSS after requests "
        "includes activation buffers the allocator keeps, so it moves by tens of MB between "
        "runs; the loaded figures are the stable ones. The server process also holds the "
        "HTTP stack; the tunelab.load process does not.",
    ])


def in_process_markdown(result: dict) -> list[str]:
    """The in-process prediction table (results written before it was measured lack it)."""
    found = result.get("in_process")
    if not found:
        return []
    base = result["pipeline"]["throughput"]

    def single(r: dict) -> list[str]:  # results written before these were measured lack them
        return [common.fmt(r[key]["p50_ms"] if key in r else None, 1)
                for key in ("single_short", "single")]

    rows = [[IN_PROCESS_TITLES[key], *single(r), common.fmt(r["throughput"], 0),
             f"{r['throughput'] / base:.2f}x", f"{r['agreement']:.2%}"]
            for key, r in found.items()]
    rows.insert(0, [f"transformers.pipeline (batch_size {result['args']['batch']})",
                    *single(result["pipeline"]), common.fmt(base, 0), "1.00x",
                    f"{result['pipeline']['agreement']:.2%}"])
    limit = result.get("ceiling")  # results written before it was measured lack it
    if limit:
        rows.append(["ceiling: the encoder's bf16 matmuls alone at the rate probed here, "
                     "nothing else", "—", "—", common.fmt(limit["sentences_per_s"], 0),
                     f"{limit['sentences_per_s'] / base:.2f}x", "—"])
    return [common.markdown_table(["prediction in one process, no HTTP",
                                   f"1 short sentence p50 (ms, ≤ {SHORT_WORDS} words)",
                                   "1 sentence p50 (ms)", "sentences/s", "vs pipeline",
                                   "agreement with the fp32 run"], rows),
            "One sentence per call as for the server, in this process; then "
            f"the same {found[next(iter(found))]['sentences']:,} sentences as one list: "
            "`tunelab.load(run or export).predict(texts)` (what `tunelab predict` and "
            "`tunelab eval` run: the LoRA adapter folded into the base weights, length-sorted "
            "batches of up to 64, bf16 autocast where the CPU has it) against the pipeline; the "
            "server keeps adapters apart from the base they share, and folds the adapter of a "
            "run alone on its base (in bf16 or fp32) as `tunelab predict` merges it.",
            *ceiling_note(limit, base)]


def ceiling_note(limit: dict | None, base: float) -> list[str]:
    if not limit:
        return []
    return [f"Ceiling: the sentences average {limit['mean_tokens']:g} tokens, "
            f"{limit['mflop_per_sentence']:g} MFLOP each through the encoder (2 per weight, "
            "attention's scores and mixing; embeddings and head free); its four matmul shapes "
            "(query/key/value stacked, output, feed-forward up and down) ran at "
            f"{limit['bf16_gflops']:g} GFLOP/s in bf16 at {limit['rows']:,} rows "
            "(a batch of sentences of mean length), in the layout prediction uses, in this run. No "
            "prediction path passes that: everything else (softmax, norms, activations, "
            "tokenising) is counted free. 8x the pipeline would be "
            f"{8 * base:,.0f} sentences/s, {8 * base / limit['sentences_per_s']:.2f}x the "
            "ceiling."]


def memory_row(mem: dict, kind: str, when: str, n: int, title: str) -> list[str]:
    """Per extra adapter from 2 adapters where 2 was measured (a lone run is folded), else
    from 1 (results written before lack 2)."""
    one, many = mem[f"{kind}_{when}_1"], mem[f"{kind}_{when}_{n}"]
    two = mem.get(f"{kind}_{when}_2")
    first, count = (two, 2) if two is not None and n > 2 else (one, 1)
    return [title, common.fmt(one, 0), common.fmt(two, 0) if two is not None else "—",
            common.fmt(many, 0),
            common.fmt((many - first) / (n - count), 1) if n > count else "—"]
