"""Serving latency, throughput, agreement and memory: `tunelab serve` against a plain
`transformers.pipeline("text-classification")`, with MiniLM.

Measured, with a LoRA run (a given RUN_DIR, or one trained here: configs/minilm/sst2_lora.yaml
for one epoch, about two minutes):
  pipeline   the run exported as a merged Transformers folder, called in-process (no HTTP):
             one sentence per call, then the sentences in lists with batch_size=BATCH
  serve      `tunelab serve` in its own process over HTTP from this process: the run in fp32
             and in bf16 (torch; in bf16 alone, its adapter folded, and beside a copy of itself
             on the same base, kept apart), and its onnx and int8 exports (ONNX Runtime,
             exported here);
             one sentence per request, sequentially (p50/p99 latency), then CLIENTS concurrent
             clients sending BATCH sentences per request (sentences/s)
  in process `tunelab.load(...).predict(list)` for the run (fp32, bf16; the adapter folded
             in, as `tunelab predict` runs it and as the server computes a run alone on
             its base in bf16; and bf16 with the adapter kept apart, as the server computes
             runs that share a base) and for its onnx/int8 exports, on the sentences the
             pipeline gets as one list
  agreement  every configuration labels the AGREE first demo test sentences; the share whose
             label equals the run's own fp32 prediction, adapter apart (`tunelab.load(...,
             merge=False)`, in this process)
  memory     RSS of the server with 1 adapter and with ADAPTERS copies of it under different
             names (they share the base), and of one process holding ADAPTERS
             `tunelab.load` predictors (no sharing)

The client (`http.client`, a keep-alive connection per client thread) runs on the same machine
as the server: it takes CPU from it, so figures are conservative; comparisons like for like.

    .venv/bin/python bench/serve_latency.py                          # full size
    .venv/bin/python bench/serve_latency.py RUN_DIR --single 20 --batched 2 --agree 64 \
        --adapters 2 --out /tmp/serve_latency.json --markdown ''     # a smoke run
"""
from __future__ import annotations

import argparse
import csv
import importlib.resources
import inspect
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import mfu  # noqa: E402
import serve_report  # noqa: E402

NAME = "serve_latency"
SHORT_WORDS = serve_report.SHORT_WORDS
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, NAME)
    parser.add_argument("run_dir", nargs="?", type=Path,
                        help="a finished LoRA run (default: train configs/minilm/sst2_lora.yaml "
                             "for one epoch)")
    parser.add_argument("--single", type=int, default=300, help="one-sentence requests each")
    parser.add_argument("--batched", type=int, default=20, help="batched requests per client")
    parser.add_argument("--batch", type=int, default=32, help="sentences per batched request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--adapters", type=int, default=10,
                        help="adapters served at once for the memory figure (default 10)")
    parser.add_argument("--precisions", default="fp32,bf16,bf16_shared",
                        help="server precisions to measure (bf16_shared: bf16 beside another "
                             "run on the same base)")
    parser.add_argument("--exports", default="onnx,int8",
                        help="export kinds to serve and measure ('' = none)")
    parser.add_argument("--agree", type=int, default=0,
                        help="sentences labelled for the agreement column (default 0: all)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="the server's --max-wait-ms (default 5, as `tunelab serve`)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for server and pipeline (default 0: every core); "
                             "on a busy machine 1 avoids OpenMP stalls")
    parser.add_argument("--child-load", type=Path, help=argparse.SUPPRESS)  # internal
    return parser.parse_args(argv)


def sentences() -> list[str]:
    path = importlib.resources.files("tunelab.demo") / "sst2_test.csv"
    with open(str(path), newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


def quick_lora_run(workdir: Path, data_dir: Path) -> Path:
    """A trained run (SST-2, ~85% test accuracy): agreement on a barely trained one, whose
    probabilities all sit near 0.5, would say nothing."""
    run = workdir / "minilm-lora"
    recipe = common.REPO_ROOT / "configs" / "minilm" / "sst2_lora.yaml"
    sst2 = data_dir / "sst2"
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(recipe), "train.epochs=1",
                    f"data.train={sst2 / 'train.txt'}", f"data.validation={sst2 / 'dev.txt'}",
                    f"data.test={sst2 / 'test.txt'}", "train.tracker=none", f"run_dir={run}"],
                   check=True, env=ENV, cwd=common.REPO_ROOT)
    return run


def single_latencies(call, texts: list[str], n: int) -> dict:
    """p50/p99 of `n` sequential one-sentence calls, over all `texts` and over the short ones."""
    short = [t for t in texts if len(t.split()) <= SHORT_WORDS]
    out = {}
    for key, pool in (("single", texts), ("single_short", short)):
        latencies = []
        for i in range(n):
            t = time.perf_counter()
            call(pool[i % len(pool)])
            latencies.append(time.perf_counter() - t)
        out[key] = percentiles(latencies)
    return out


def agreement(labels: list[str], reference: list[str]) -> float:
    return sum(a == b for a, b in zip(labels, reference, strict=True)) / len(reference)


def percentiles(latencies: list[float]) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    return {"p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            "mean_ms": statistics.fmean(ms), "n": len(ms)}


def concurrently(clients: int, work) -> float:
    """Run work(i) in `clients` threads; wall seconds."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# baseline: transformers.pipeline in this process


def bench_pipeline(run_dir: Path, texts: list[str], args, workdir: Path,
                   reference: list[str]) -> dict:
    import torch
    from transformers import pipeline

    from tunelab.export import export

    if args.threads:
        torch.set_num_threads(args.threads)
    merged = export(run_dir, "merged", workdir / "merged")
    pipe = pipeline("text-classification", model=str(merged), device=-1)
    pipe(texts[:8])  # warm up
    latencies = single_latencies(pipe, texts, args.single)
    n = args.batched * args.clients * args.batch
    batch = [texts[i % len(texts)] for i in range(n)]
    t = time.perf_counter()
    pipe(batch, batch_size=args.batch)
    wall = time.perf_counter() - t
    labels = [p["label"] for p in pipe(texts[:len(reference)], batch_size=args.batch)]
    return {**latencies, "throughput": n / wall, "sentences": n,
            "agreement": agreement(labels, reference)}


def bench_in_process(target: Path, texts: list[str], args, reference: list[str],
                     **load_kwargs) -> dict:
    """`tunelab.load(...).predict(list)` in this process (what `tunelab predict` runs), on the
    sentences the pipeline got as one list; and one sentence per call, as the pipeline's
    single-sentence latency is measured."""
    import tunelab

    predictor = tunelab.load(target, **load_kwargs)
    predictor.predict(texts[:8])  # warm up
    latencies = single_latencies(lambda text: predictor.predict([text]), texts, args.single)
    n = args.batched * args.clients * args.batch
    batch = [texts[i % len(texts)] for i in range(n)]
    t = time.perf_counter()
    predictor.predict(batch)
    wall = time.perf_counter() - t
    labels = [p["label"] for p in predictor.predict(texts[:len(reference)])]
    return {**latencies, "throughput": n / wall, "sentences": n,
            "agreement": agreement(labels, reference)}


def ceiling(texts: list[str], args) -> dict:
    """What no prediction path can pass here: the sentences the throughput rows predict, at
    the bf16 rate of their matmuls alone (`mfu.prediction_ceiling`)."""
    from transformers import AutoTokenizer

    from tunelab.models import resolve_model

    from tunelab.predict import Predictor

    n = args.batched * args.clients * args.batch
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    batch = inspect.signature(Predictor.from_run).parameters["batch_size"].default
    return mfu.prediction_ceiling(tokenizer, [texts[i % len(texts)] for i in range(n)],
                                  mfu.model_shapes(), batch)


# --------------------------------------------------------------------------------------------
# tunelab serve in a child process


class Server:
    def __init__(self, specs: list[str], precision: str, max_wait_ms: float, threads: int):
        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tunelab", "serve", *specs, "--port", str(self.port),
             "--precision", precision, "--max-wait-ms", str(max_wait_ms),
             "--threads", str(threads)],
            env=ENV, cwd=common.REPO_ROOT, stdout=subprocess.DEVNULL,
            stderr=self.log)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        self.local = threading.local()
        for _ in range(1200):  # loading 10 runs of MiniLM takes a while on a busy box
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"tunelab serve exited: {self.log.read().decode()[-3000:]}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.25)
        self.stop()
        raise SystemExit("tunelab serve did not come up within 5 minutes")

    def classify(self, model: str, texts: list[str]) -> list[dict]:
        """POST /v1/classify on this thread's keep-alive connection (`http.client`: httpx
        took ~1.5 ms more of the shared CPU a request, the client's cost, not the server's)."""
        import http.client
        import json

        body = json.dumps({"model": model, "texts": texts})
        for attempt in (1, 2):  # the server closes a connection left idle for 5 s: open anew
            if getattr(self.local, "conn", None) is None:
                self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                self.local.conn.request("POST", "/v1/classify", body,
                                        {"Content-Type": "application/json"})
                r = self.local.conn.getresponse()
                break
            except (ConnectionError, http.client.RemoteDisconnected):
                self.local.conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"/v1/classify answered {r.status}: {body[:500]!r}")
        return json.loads(body)["predictions"]

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def bench_server(folder: Path, precision: str, texts: list[str], args,
                 reference: list[str]) -> dict:
    """`folder`: the run (served in `precision`) or an onnx/int8 export of it. `bf16_shared`:
    the run in bf16 beside a copy of itself on the same base, so that its adapter is kept
    apart (a lone run's is folded)."""
    specs = [f"run={folder}"]
    if precision == "bf16_shared":
        precision, specs = "bf16", specs + [f"twin={folder}"]
    server = Server(specs, precision, args.max_wait_ms, args.threads)
    try:
        for i in range(10):
            server.classify("run", texts[i:i + args.batch])  # warm up
        latencies = single_latencies(lambda text: server.classify("run", [text]), texts,
                                     args.single)

        def client(c):
            for k in range(args.batched):
                start = ((c * args.batched + k) * args.batch) % len(texts)
                server.classify("run", (texts * 2)[start:start + args.batch])

        wall = concurrently(args.clients, client)
        n = args.clients * args.batched * args.batch
        rss = server.rss_mb()
        labels = [p["label"] for start in range(0, len(reference), args.batch)
                  for p in server.classify("run", texts[start:min(start + args.batch,
                                                                  len(reference))])]
        return {**latencies, "throughput": n / wall, "sentences": n, "rss_mb": rss,
                "agreement": agreement(labels, reference),
                "served": server.client.get("/v1/models").json()["models"][0]}
    finally:
        server.stop()


def bench_memory(run_dir: Path, texts: list[str], args) -> dict:
    """RSS after loading and after one request per adapter, with 1, 2 and N adapters (a lone
    run is folded: the cost of another adapter counts from 2)."""
    n, out = args.adapters, {}
    for count in sorted({1, min(2, n), n}):
        server = Server([f"a{i}={run_dir}" for i in range(count)], "fp32", args.max_wait_ms,
                        args.threads)
        try:
            out[f"serve_loaded_{count}"] = server.rss_mb()
            for i in range(count):
                server.classify(f"a{i}", texts[:args.batch])
            out[f"serve_served_{count}"] = server.rss_mb()
        finally:
            server.stop()
    child = subprocess.run([sys.executable, __file__, "--child-load", str(run_dir),
                            "--adapters", str(n), "--batch", str(args.batch)], env=ENV,
                           capture_output=True, text=True, check=True, cwd=common.REPO_ROOT)
    values = [float(x) for x in child.stdout.strip().splitlines()[-1].split()]
    keys = ["load_loaded_1", "load_served_1", f"load_loaded_{n}", f"load_served_{n}"]
    out.update(zip(keys, values))
    return out


def fp32_labels(run_dir: Path, texts: list[str]) -> list[str]:
    """What the run itself says, in fp32 and with its adapter kept apart from the base (the
    model as it trained): the reference of the agreement column."""
    import tunelab

    predictor = tunelab.load(run_dir, precision="fp32", merge=False)
    return [p["label"] for p in predictor.predict(texts)]


def child_load(run_dir: Path, n: int, texts: list[str], batch: int) -> None:
    """`tunelab.load` n times in one process (no sharing); prints RSS after loading and after
    one prediction call each, with 1 and then with n predictors."""
    import psutil

    import tunelab

    def rss():
        return psutil.Process().memory_info().rss / 2**20

    predictors, values = [tunelab.load(run_dir, precision="fp32")], []
    values.append(rss())
    predictors[0].predict(texts[:batch])
    values.append(rss())
    predictors += [tunelab.load(run_dir, precision="fp32") for _ in range(n - 1)]
    values.append(rss())
    for p in predictors:
        p.predict(texts[:batch])
    values.append(rss())
    print(*values)


# --------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    from tunelab.export import export

    args = parse_args(argv)
    texts = sentences()
    if args.child_load:
        child_load(args.child_load, args.adapters, texts, args.batch)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        run_dir = args.run_dir or quick_lora_run(workdir, args.data_dir)
        print(f"run: {run_dir}", file=sys.stderr)
        reference = fp32_labels(run_dir, texts[:args.agree or len(texts)])
        result = {"command": common.command_line(), "date": common.now(),
                  "machine": common.machine_info(), "run_dir": str(run_dir),
                  "agreement_n": len(reference),
                  "args": {k: v for k, v in vars(args).items()
                           if k in ("single", "batched", "batch", "clients", "adapters",
                                    "max_wait_ms", "threads")}}
        result["pipeline"] = bench_pipeline(run_dir, texts, args, workdir, reference)
        print(f"pipeline: {result['pipeline']}", file=sys.stderr)
        result["in_process"] = {
            precision: bench_in_process(run_dir, texts, args, reference, precision=precision)
            for precision in ("fp32", "bf16")}
        result["in_process"]["bf16_unmerged"] = bench_in_process(
            run_dir, texts, args, reference, precision="bf16", merge=False)
        print(f"in process: {result['in_process']}", file=sys.stderr)
        result["serve"] = {}
        for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
            result["serve"][precision] = bench_server(run_dir, precision, texts, args,
                                                      reference)
            print(f"serve {precision}: {result['serve'][precision]}", file=sys.stderr)
        for kind in [k.strip() for k in args.exports.split(",") if k.strip()]:
            folder = export(run_dir, kind, workdir / kind)
            result["serve"][kind] = bench_server(folder, "auto", texts, args, reference)
            print(f"serve {kind} export: {result['serve'][kind]}", file=sys.stderr)
            result["in_process"][kind] = bench_in_process(folder, texts, args, reference)
            print(f"in process {kind} export: {result['in_process'][kind]}", file=sys.stderr)
        result["memory"] = bench_memory(run_dir, texts, args)
        print(f"memory: {result['memory']}", file=sys.stderr)
        result["ceiling"] = ceiling(texts, args)
        print(f"ceiling: {result['ceiling']}", file=sys.stderr)
    common.write_json(args.out, result)
    text = serve_report.markdown(result)
    print(text)
    if args.markdown:
        common.update_markdown_section(args.markdown, NAME, text)


if __name__ == "__main__":
    main()
