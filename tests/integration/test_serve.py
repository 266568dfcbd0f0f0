"""`tunelab serve` end to end: a real uvicorn server on a loopback port, spoken to over HTTP.

Three tiny runs (lora, freeze, full) on one tiny base are served at once; every answer must
equal `tunelab.load(run).predict` for the same inputs.
"""
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from serving import running

import tunelab
from tunelab.cli import build_parser, main
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.pool import ModelPool

KEY = "s3cret"
TEXTS = ["the film was great", "a boring plot and very dull acting", "it", "superb cast",
         "the story was quite weak and the ending really poor", "lovely", "this movie", "bad"]
PAIRS = ["good", "awful acting", "the plot", "fine", "a film", "dull", "very weak", "great"]


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


@pytest.fixture(scope="module")
def runs(tiny_bert, toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_runs")
    common = [f"model.name={tiny_bert}", f"data.train={toy_data['train']}",
              f"data.validation={toy_data['validation']}", f"data.test={toy_data['test']}",
              "train.batch_size=4", "train.epochs=3", "train.precision=fp32",
              "train.threads=1", "train.tracker=none", "model.max_length=32"]
    out = {}
    for name, extra in (("lora", ["train.lr=5e-3"]), ("freeze", ["train.lr=1e-2"]),
                        ("full", ["train.lr=1e-3"]), ("bitfit", ["train.lr=1e-2"])):
        out[name] = root / name
        assert main(["train", *common, f"method.name={name}", *extra,
                     f"run_dir={out[name]}"]) == 0
    return out


@pytest.fixture(scope="module")
def reference(runs):
    """What `tunelab predict` says, per run, for TEXTS (and TEXTS with PAIRS)."""
    out = {}
    for name, run in runs.items():
        predictor = tunelab.load(run)
        out[name] = predictor.predict(TEXTS)
        out[name, "pairs"] = predictor.predict(TEXTS, PAIRS)
    return out


@pytest.fixture(scope="module")
def pool(runs):
    pool = ModelPool()
    for name in ("lora", "freeze", "full"):
        pool.add(name, runs[name])
    return pool


@pytest.fixture(scope="module")
def server(pool):
    app = create_app(pool, ServeSettings(api_key=KEY, max_texts=8, max_chars=60,
                                         max_batch=16, max_wait_ms=5, threads=1))
    with running(app) as url, httpx.Client(base_url=url, timeout=30,
                                           headers={"X-API-Key": KEY}) as client:
        yield client, app


def assert_same(got: list[dict], want: list[dict]):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["label"] == w["label"]
        assert g["score"] == pytest.approx(w["score"], abs=1e-6)
        assert g["scores"] == pytest.approx(w["scores"], abs=1e-6)


def classify(client, **body):
    return client.post("/v1/classify", json=body)


# --------------------------------------------------------------------------------------------


def test_every_run_serves_what_predict_returns(server, reference):
    client, _ = server
    for name in ("lora", "freeze", "full", "lora", "full"):  # switch model per request
        r = classify(client, model=name, texts=TEXTS)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        assert_same(r.json()["predictions"], reference[name])
    r = classify(client, model="freeze", texts=TEXTS, text_pairs=PAIRS)
    assert_same(r.json()["predictions"], reference["freeze", "pairs"])
    r = classify(client, model="lora", texts=TEXTS[2:3])
    assert_same(r.json()["predictions"], reference["lora"][2:3])
    # the three runs really are different models
    assert len({json.dumps(classify(client, model=m, texts=TEXTS).json()["predictions"])
                for m in ("lora", "freeze", "full")}) == 3


def test_models_health_metrics_and_openapi(server):
    client, _ = server
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"lora", "freeze", "full"}
    assert models["lora"]["method"] == "lora" and models["lora"]["labels"] == ["negative",
                                                                               "positive"]
    assert 0 < models["freeze"]["trainable_params"] < models["lora"]["trainable_params"] \
        < models["full"]["trainable_params"]
    assert models["lora"]["shares_base"] == models["freeze"]["shares_base"] is not None
    assert models["full"]["shares_base"] is None
    health = httpx.get(f"{client.base_url}/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    classify(client, model="freeze", texts=TEXTS[:3])
    classify(client, model="nope", texts=TEXTS[:3])
    text = client.get("/metrics").text
    assert 'tunelab_requests_total{endpoint="/v1/classify",model="freeze",status="200"}' in text
    assert 'tunelab_requests_total{endpoint="/v1/classify",model="",status="404"}' in text
    assert 'tunelab_request_seconds_bucket{endpoint="/v1/classify",le="0.1"}' in text
    assert 'tunelab_batch_texts_count{model="freeze"}' in text
    assert "tunelab_queue_depth 0.0" in text
    assert 'tunelab_errors_total{type="model_not_found"}' in text
    spec = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])
    assert "ClassifyRequest" in spec["components"]["schemas"]


def test_adapter_runs_share_the_base_weights(pool, runs):
    """Frozen base tensors are one storage for every adapter run; only trained ones differ."""
    [base] = pool.bases.values()
    base_ptrs = {t.data_ptr() for t in base.params.values()}
    for name in ("lora", "freeze"):
        model = pool.models[name].predictor.model
        frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
        assert base_ptrs <= frozen, name  # every base tensor, none copied
        assert not base_ptrs & {p.data_ptr() for p in model.parameters() if p.requires_grad}
    full = pool.models["full"].predictor.model
    assert not base_ptrs & {p.data_ptr() for p in full.parameters()}
    assert pool.models["freeze"].private_bytes < 1000  # a 2-label head on a 32-wide model


def test_in_bf16_adapter_runs_share_the_base_layout_and_predict_as_loaded(runs):
    """Served in bf16, a LoRA run alone on its base has its adapter folded (on CPUs with the
    packed bf16 matmul) and predicts exactly as `tunelab.load(run, precision="bf16")`, merged;
    once another run joins the base it is unfolded, and adapter runs freeze their weights and
    lay the shared base out for the matmul once for all of them; each then predicts exactly as
    `tunelab.load(run, precision="bf16", merge=False)`."""
    from tunelab.train.frozen import _can_pack

    pool = ModelPool(precision="bf16")
    lone = pool.add("lora", runs["lora"])
    merged = tunelab.load(runs["lora"], precision="bf16")
    described = lone.describe()
    assert described["adapter_folded"] == _can_pack() == (lone.folded_bytes > 0)
    assert described["private_mb"] * 2**20 >= lone.private_bytes + lone.folded_bytes - 2**10
    if _can_pack():
        assert torch.equal(lone.predictor.logits(TEXTS), merged.logits(TEXTS))
    at_start = ModelPool(precision="bf16")  # `tunelab serve RUN...`: folds once all are in
    at_start.add("lora", runs["lora"], settle=False)
    assert at_start.models["lora"].folded_bytes == 0
    at_start.settle()
    assert (at_start.models["lora"].folded_bytes > 0) == _can_pack()
    pool.add("freeze", runs["freeze"])
    for name in ("lora", "freeze"):
        served = pool.models[name]
        assert served.describe()["trainable_params"] > 0  # counted before freezing
        assert not served.describe()["adapter_folded"] and served.folded_bytes == 0
        alone = tunelab.load(runs[name], precision="bf16", merge=False)
        assert torch.equal(served.predictor.logits(TEXTS), alone.logits(TEXTS)), name
    layouts = [{id(m.__dict__["_pack_cache"][1]) for m in pool.models[name].predictor.model
                .modules() if "_pack_cache" in m.__dict__} for name in ("lora", "freeze")]
    assert bool(layouts[0] & layouts[1]) == _can_pack()


def test_in_fp32_a_lone_lora_run_is_folded_in_fp32_and_unfolded_beside_another(runs):
    """Served in fp32 (`auto` on CPUs without fast bf16), a LoRA run alone on its base has its
    adapter folded into fp32 weights laid out for oneDNN (x86), predicting as the run merged in
    fp32 to fp32's precision; a second run on the base unfolds it, and each then predicts as
    `tunelab.load(run, precision="fp32", merge=False)`."""
    from tunelab.train.frozen import can_pack

    packs = can_pack(torch.float32)
    pool = ModelPool(precision="fp32")
    lone = pool.add("lora", runs["lora"])
    assert lone.describe()["adapter_folded"] == packs == (lone.folded_bytes > 0)
    if packs:
        weights = sum(m.base_layer.weight.numel() for m in lone.predictor.model.modules()
                      if hasattr(m, "base_layer") and hasattr(m, "lora_A"))
        assert lone.folded_bytes == 4 * weights  # fp32
    merged = tunelab.load(runs["lora"], precision="fp32")
    torch.testing.assert_close(lone.predictor.logits(TEXTS), merged.logits(TEXTS),
                               rtol=1e-5, atol=1e-5)
    pool.add("freeze", runs["freeze"])
    assert lone.folded_bytes == 0
    assert not any(getattr(m.__dict__.get("_plan"), "fold", False)
                   for m in lone.predictor.model.modules())
    for name in ("lora", "freeze"):
        alone = tunelab.load(runs[name], precision="fp32", merge=False)
        torch.testing.assert_close(pool.models[name].predictor.logits(TEXTS),
                                   alone.logits(TEXTS), rtol=1e-5, atol=1e-5)


def test_bad_requests_get_clear_errors(server):
    client, _ = server

    def error(r, status, *words):
        assert r.status_code == status, r.text
        message = r.json()["error"]["message"]
        for w in words:
            assert w in message, message

    error(classify(client, model="lora", texts=["a"] * 9), 413, "--max-texts", "8", "texts[8]")
    error(classify(client, model="lora", texts=["ok", "x" * 61]), 413, "texts[1]", "--max-chars")
    error(classify(client, model="lora", texts=["ok"], text_pairs=["y" * 61]), 413,
          "text_pairs[0]")
    error(classify(client, model="nope", texts=["a"]), 404, "'nope'", "lora", "freeze", "full")
    error(classify(client, texts=["a"]), 422, "several are served", "lora")
    error(classify(client, model="lora"), 422, "texts")
    error(classify(client, model="lora", texts=[]), 422, "empty")
    error(classify(client, model="lora", texts=["a", "b"], text_pairs=["c"]), 422, "text_pairs")
    error(classify(client, model="lora", texts=[3]), 422, "texts.0")
    headers = {"Content-Type": "application/json"}
    error(client.post("/v1/classify", content=b'{"texts": [', headers=headers), 400, "JSON")
    error(client.post("/v1/classify", content=b'{"texts": ["a"]}',
                      headers={"Content-Type": "text/plain"}), 415, "application/json")
    error(client.post("/v1/classify", content=b" " * 200_000, headers=headers), 413, "bytes")
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{client.base_url}/v1/classify", json={"model": "lora", "texts": ["a"]},
                       headers=headers)
        error(r, 401, "API key")
    error(httpx.get(f"{client.base_url}/metrics"), 401)
    r = httpx.post(f"{client.base_url}/v1/classify", json={"model": "lora", "texts": ["a"]},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200


def test_full_queue_answers_503_at_once(pool, reference):
    app = create_app(pool, ServeSettings(queue_size=1, max_wait_ms=0, threads=1))
    batcher = app.state.batcher
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        batcher.pause()  # the worker takes nothing: the first request fills the queue
        try:
            first = {}
            waiting = threading.Thread(target=lambda: first.update(
                r=classify(client, model="freeze", texts=TEXTS)))
            waiting.start()
            for _ in range(500):
                if batcher.depth() == 1:
                    break
                time.sleep(0.01)
            assert batcher.depth() == 1
            r = classify(client, model="lora", texts=["a"])
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "--queue-size" in r.json()["error"]["message"]
        finally:
            batcher.resume()
        waiting.join(10)
        assert first["r"].status_code == 200
        assert_same(first["r"].json()["predictions"], reference["freeze"])
        assert 'tunelab_errors_total{type="overloaded"} 1.0' in client.get("/metrics").text


def test_waiting_requests_share_one_forward_pass(server, reference):
    client, app = server
    batcher, registry = app.state.batcher, app.state.metrics.registry

    def batches():
        labels = {"model": "freeze"}
        return (registry.get_sample_value("tunelab_batch_texts_count", labels) or 0,
                registry.get_sample_value("tunelab_batch_texts_sum", labels) or 0)

    before = batches()
    jobs = [slice(0, 2), slice(2, 4), slice(4, 7), slice(1, 2)]  # the last one with pairs
    results = [None] * len(jobs)

    def send(i):
        body = {"model": "freeze", "texts": TEXTS[jobs[i]]}
        if i == 3:
            body["text_pairs"] = PAIRS[jobs[i]]
        results[i] = client.post("/v1/classify", json=body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    batcher.pause()
    try:
        for t in threads:
            t.start()
        for _ in range(500):
            if batcher.depth() == len(jobs):
                break
            time.sleep(0.01)
        assert batcher.depth() == len(jobs)
    finally:
        batcher.resume()
    for t in threads:
        t.join(30)
    after = batches()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 8)  # 7 texts + 1 pair: 2 passes
    for i, job in enumerate(jobs[:3]):
        assert_same(results[i].json()["predictions"], reference["freeze"][job])
    assert_same(results[3].json()["predictions"], reference["freeze", "pairs"][jobs[3]])


def test_concurrent_clients_each_get_their_own_answers(server, reference):
    client, app = server
    failures = []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(10):
            model = rng.choice(["lora", "freeze", "full"])
            idx = rng.sample(range(len(TEXTS)), rng.randint(1, 4))
            r = classify(client, model=model, texts=[TEXTS[i] for i in idx])
            try:
                assert r.status_code == 200, r.text
                assert_same(r.json()["predictions"], [reference[model][i] for i in idx])
            except AssertionError as e:
                failures.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:3]
    assert not any(t.is_alive() for t in threads)


def test_add_a_run_at_runtime_without_reloading_the_base(server, runs, reference):
    client, app = server
    pool = app.state.pool
    [base] = pool.bases.values()
    word = "bert.embeddings.word_embeddings.weight"
    before = base.params[word].data_ptr()
    r = client.post("/v1/models", json={"name": "bitfit", "run_dir": str(runs["bitfit"])})
    assert r.status_code == 201, r.text
    assert r.json()["method"] == "bitfit" and r.json()["shares_base"] == base.path
    assert list(pool.bases.values()) == [base] and base.params[word].data_ptr() == before
    model = pool.models["bitfit"].predictor.model
    assert dict(model.named_parameters())[word].data_ptr() == before
    assert_same(classify(client, model="bitfit", texts=TEXTS).json()["predictions"],
                reference["bitfit"])
    # bitfit trains the base's biases: its own copies, the other runs are untouched
    assert_same(classify(client, model="freeze", texts=TEXTS).json()["predictions"],
                reference["freeze"])
    assert "bitfit" in [m["name"] for m in client.get("/v1/models").json()["models"]]
    assert client.post("/v1/models", json={"name": "bitfit",
                                           "run_dir": str(runs["bitfit"])}).status_code == 409
    r = client.post("/v1/models", json={"name": "x", "run_dir": str(runs["bitfit"].parent)})
    assert r.status_code == 422 and "not a tunelab run" in r.json()["error"]["message"]


def test_serve_command(runs, reference):
    """The CLI verb in its own process: NAME=RUN_DIR, the key from $TUNELAB_API_KEY."""
    args = build_parser().parse_args(["serve", "a=b", "--api-key", "k", "--max-batch", "8",
                                      "--max-wait-ms", "1", "--queue-size", "3",
                                      "--max-texts", "4", "--max-chars", "9", "--threads", "3"])
    assert (args.runs, args.api_key, args.max_batch, args.max_wait_ms, args.queue_size,
            args.max_texts, args.max_chars, args.threads, args.host) == (
        ["a=b"], "k", 8, 1.0, 3, 4, 9, 3, "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TUNELAB_API_KEY": KEY, "PYTHONPATH": str(Path(tunelab.__file__)
                                                                   .parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", f"mine={runs['lora']}",
                             "--port", str(port), "--precision", "fp32", "--threads", "1"],
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):  # up to ~60 s: the child imports torch and transformers
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"{url}/v1/classify", json={"texts": TEXTS},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "mine"
        assert_same(r.json()["predictions"], reference["lora"])
        assert httpx.post(f"{url}/v1/classify", json={"texts": TEXTS}).status_code == 401
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "loaded mine: lora" in out, out


def test_serve_command_errors_are_one_clear_line(runs, capsys):
    assert main(["serve", str(runs["lora"].parent)]) == 2
    assert "not a tunelab run" in capsys.readouterr().err
    assert main(["serve", f"a={runs['lora']}", f"a={runs['freeze']}"]) == 2
    assert "two runs are served as 'a'" in capsys.readouterr().err
    assert main(["serve", str(runs["lora"]), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err
