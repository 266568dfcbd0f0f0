"""Exports behind `tunelab serve` and `tunelab predict`, and `tunelab verify --url` against a
live server on a loopback port.

A tiny LoRA run is exported to onnx and int8; the server's answers for an export must equal
what `tunelab.exported.load(export).predict` says (one engine), and verify --url must pass
for a server that serves the run (or its export) and fail, saying why, for one that serves
another run under the same name.
"""
import csv
import time

import httpx
import pytest
from serving import running

import tunelab
from tunelab import exported
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.serve.app import ServeSettings, create_app, parse_run_specs
from tunelab.serve.pool import ModelPool

KEY = "k3y"
TEXTS = ["the film was great", "a boring plot and very dull acting", "it", "superb cast",
         "the story was quite weak and the ending really poor", "lovely", "this movie", "bad"]
PAIRS = ["good", "awful acting", "the plot", "fine", "a film", "dull", "very weak", "great"]


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


@pytest.fixture(scope="module")
def runs(tiny_bert, toy_data, tmp_path_factory):
    """A LoRA run with its onnx and int8 exports, and a freeze run (same labels, other
    weights)."""
    root = tmp_path_factory.mktemp("serve_exports")
    common = [f"model.name={tiny_bert}", f"data.train={toy_data['train']}",
              f"data.test={toy_data['test']}", "train.batch_size=4", "train.epochs=4",
              "train.precision=fp32", "train.threads=1", "train.tracker=none",
              "model.max_length=32"]
    for name, lr in (("lora", "5e-3"), ("freeze", "1e-2")):
        assert main(["train", *common, f"method.name={name}", f"train.lr={lr}",
                     f"run_dir={root / name}"]) == 0
    assert main(["export", str(root / "lora"), "--to", "onnx,int8,merged"]) == 0
    return {"lora": root / "lora", "freeze": root / "freeze",
            **{kind: root / "lora" / "export" / kind for kind in ("onnx", "int8", "merged")}}


@pytest.fixture(scope="module")
def server(runs):
    """The lora run (fp32) and both its exports, under their own names; an API key; a
    max_wait far longer than any answer takes."""
    pool = ModelPool("fp32", 64, threads=1)
    for name in ("lora", "onnx", "int8"):
        pool.add(name, runs[name])
    app = create_app(pool, ServeSettings(api_key=KEY, max_wait_ms=500, threads=1))
    with running(app) as url, httpx.Client(base_url=url, timeout=30,
                                           headers={"X-API-Key": KEY}) as client:
        yield url, client


def test_a_served_export_answers_as_its_predictor(server, runs):
    url, client = server
    for kind in ("onnx", "int8"):
        engine = exported.load(runs[kind], threads=1)
        for pairs in (None, PAIRS):
            r = client.post("/v1/classify", json={"model": kind, "texts": TEXTS,
                                                  "text_pairs": pairs})
            assert r.status_code == 200, r.text
            assert r.json()["predictions"] == engine.predict(TEXTS, pairs)
    reference = tunelab.load(runs["lora"], precision="fp32").predict(TEXTS)
    onnx = client.post("/v1/classify", json={"model": "onnx", "texts": TEXTS}).json()
    for got, want in zip(onnx["predictions"], reference):  # fp32 ONNX: the run's numbers
        assert got["label"] == want["label"]
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-4)

    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert (models["int8"]["backend"], models["int8"]["export"], models["int8"]["precision"],
            models["int8"]["endpoints"]) == ("onnxruntime", "int8", "int8", ["/v1/classify"])
    assert (models["onnx"]["precision"], models["lora"]["backend"],
            models["lora"]["precision"]) == ("fp32", "torch", "fp32")
    assert models["int8"]["method"] == "lora" and models["int8"]["trainable_params"] is None
    r = client.post("/v1/explain", json={"model": "int8", "texts": TEXTS[:1]})
    assert r.status_code == 400 and "int8 export" in r.json()["error"]["message"]


def test_a_lone_request_does_not_wait_for_max_wait(server):
    """max_wait_ms is 500: a request that finds the server idle must not pay it."""
    url, client = server
    for model in ("int8", "lora", "int8"):
        start = time.perf_counter()
        r = client.post("/v1/classify", json={"model": model, "texts": TEXTS[:1]})
        took = time.perf_counter() - start
        assert r.status_code == 200
        assert took < 0.25, f"{model}: a lone request took {took:.3f} s (max_wait 0.5 s)"


def test_predict_and_serve_take_an_export_folder(runs, toy_data, tmp_path):
    out = tmp_path / "predicted.csv"
    assert main(["predict", str(runs["int8"]), "--input", toy_data["test"],
                 "--output", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    want = exported.load(runs["int8"]).predict([r["text"] for r in rows])
    loaded = tunelab.load(runs["int8"], threads=1)  # tunelab.load takes an export folder too
    assert isinstance(loaded, exported.OnnxPredictor) and loaded.predict(TEXTS) == \
        exported.load(runs["int8"], threads=1).predict(TEXTS)
    assert [r["predicted_label"] for r in rows] == [w["label"] for w in want]
    assert [float(r["score"]) for r in rows] == [round(w["score"], 6) for w in want]
    # an export is served under its run's folder name: what verify --url asks for
    assert parse_run_specs([str(runs["int8"]), f"x={runs['onnx']}"]) == [
        ("lora", runs["int8"]), ("x", runs["onnx"])]
    assert main(["serve", str(runs["lora"] / "export")]) == 2  # neither a run nor an export
    # a merged export is a Transformers folder: served and predicted through its run
    with pytest.raises(TunelabError, match=f"merged export.*serve its run \\({runs['lora']}"):
        ModelPool().add("m", runs["merged"])
    assert main(["predict", str(runs["merged"]), "--input", toy_data["test"],
                 "--output", str(out)]) == 2


def test_verify_url_passes_for_the_run_and_its_exports(server, runs, toy_data, capsys):
    url, _ = server
    probes = ["--data", toy_data["test"]]
    assert main(["verify", str(runs["lora"]), "--url", url, "--api-key", KEY, *probes]) == 0
    out = capsys.readouterr().out
    assert f"{url} lora" in out and "served fp32" in out and "ok (|Δp| ≤ 0.0001)" in out
    assert main(["verify", str(runs["lora"]), str(runs["onnx"]), "--url", url, "--model",
                 "onnx", "--api-key", KEY, *probes]) == 0
    out = capsys.readouterr().out
    assert "served onnx" in out and out.count(" ok ") == 2 and "FAIL" not in out


def test_verify_url_fails_for_a_server_of_another_run(runs, toy_data, capsys):
    pool = ModelPool("fp32", 64, threads=1)
    pool.add("lora", runs["freeze"])  # the name verify asks for by default, another run
    probes = ["--data", toy_data["test"]]
    with running(create_app(pool, ServeSettings(api_key=KEY, threads=1))) as url:
        assert main(["verify", str(runs["lora"]), "--url", url, "--api-key", KEY,
                     *probes]) == 2
        captured = capsys.readouterr()
        assert "FAIL (|Δp| ≤ 0.0001)" in captured.out
        assert f"model 'lora' at {url} answers unlike {runs['lora']}" in captured.out
        assert f"says it serves {runs['freeze']}" in captured.out
        assert "some targets differ from the run" in captured.err

        for args, words in ((["--model", "nope"], ["serves no model named 'nope'", "lora"]),
                            ([], ["needs an API key", "--api-key"])):
            key = [] if not args else ["--api-key", KEY]
            assert main(["verify", str(runs["lora"]), "--url", url, *key, *args, *probes]) == 2
            err = capsys.readouterr().err
            assert all(w in err for w in words), err
    assert main(["verify", str(runs["lora"]), "--url", url, *probes]) == 2  # server gone
    assert "cannot reach" in capsys.readouterr().err
    assert main(["verify", str(runs["lora"])]) == 2
    assert "nothing to verify" in capsys.readouterr().err
