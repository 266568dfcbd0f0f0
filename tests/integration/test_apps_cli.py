"""`tunelab monitor` and `tunelab explain` end to end on a tiny run trained here, and the
/v1/explain endpoint on a real server on a loopback port."""
import csv
import io
import json
import random

import httpx
import pytest
from conftest import toy_rows, write_csv
from serving import running

import tunelab
from tunelab.cli import main
from tunelab.explain import explain
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.pool import ModelPool

T0 = 1714557600  # 2024-05-01T10:00:00Z


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


@pytest.fixture(scope="module")
def run(tiny_bert, toy_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("apps") / "sentiment"
    assert main(["train", f"model.name={tiny_bert}", f"data.train={toy_data['train']}",
                 f"data.validation={toy_data['validation']}", f"data.test={toy_data['test']}",
                 "train.lr=1e-3", "train.batch_size=4", "train.epochs=20", "train.metric=loss",
                 "train.precision=fp32", "train.threads=1", "train.tracker=none",
                 "model.max_length=32", "train.warmup_ratio=0.0", f"run_dir={folder}"]) == 0
    return folder


def stream_rows(seed=0):
    """3 hours x 2 brands x 12 posts; brand b turns negative in the third hour."""
    rng = random.Random(seed)
    pool = toy_rows(400, 11)
    by_label = {label: [r["text"] for r in pool if r["label"] == label]
                for label in ("positive", "negative")}
    rows = []
    for hour in range(3):
        for i in range(24):
            brand = "ab"[i % 2]
            negative = rng.random() < (0.95 if (brand, hour) == ("b", 2) else 0.15)
            rows.append({"time": f"2024-05-01T{10 + hour:02d}:{i * 2:02d}:00Z", "brand": brand,
                         "text": rng.choice(by_label["negative" if negative else "positive"])})
    return rows


def expected_alerts(series, threshold, change, min_count):
    """The documented rules, applied to series.csv rows."""
    out, by_key = set(), {(r["window_start"], r["topic"]): r for r in series}
    for r in series:
        n, share = int(r["count"]), float(r["negative_share"])
        if n >= min_count and share >= threshold:
            out.add((r["window_start"], r["topic"], "threshold"))
        hour = int(r["window_start"][11:13])
        prev = by_key.get((f"{r['window_start'][:11]}{hour - 1:02d}:00:00+00:00", r["topic"]))
        if prev and n >= min_count and int(prev["count"]) >= min_count \
                and round(abs(share - float(prev["negative_share"])), 9) >= change:
            out.add((r["window_start"], r["topic"], "change"))
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_monitor_follows_a_stdin_stream(run, tmp_path, monkeypatch, capsys):
    rows = stream_rows()
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps(r) + "\n" for r in rows)))
    out = tmp_path / "report"
    assert main(["monitor", "--run", str(run), "--input", "-", "--topic-column", "brand",
                 "--min-count", "10", "--threshold", "0.6", "--change", "0.3", "--follow",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # the series is exactly what the run predicts, counted per hour and brand
    labels = [p["label"] for p in tunelab.load(run).predict([r["text"] for r in rows])]
    want = {}
    for row, label in zip(rows, labels):
        key = (f"2024-05-01T{row['time'][11:13]}:00:00+00:00", row["brand"])
        want.setdefault(key, [0, 0])[label == "negative"] += 1
    series = read_csv(out / "series.csv")
    assert {(r["window_start"], r["topic"]): [int(r["n_positive"]), int(r["n_negative"])]
            for r in series} == want
    assert all(int(r["count"]) == 12 for r in series)
    # the alerts follow the documented rules, and --follow printed each as it was raised
    alerts = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()]
    got = {(a["window_start"], a["topic"], a["reason"]) for a in alerts}
    assert got == expected_alerts(series, 0.6, 0.3, 10)
    assert ("2024-05-01T12:00:00+00:00", "b", "threshold") in got
    live = [line for line in printed.splitlines() if line.startswith("ALERT")]
    assert live == [a["message"] for a in alerts]
    assert printed.index(live[-1]) < printed.index("# Monitor report")
    assert (out / "trend.png").stat().st_size > 10_000
    assert "<stdin>: 72 texts, 0 skipped rows" in (out / "report.md").read_text()


def test_monitor_a_file_with_a_topic_run_and_bad_rows(run, tmp_path, capsys):
    rows = [{"time": T0 + 60 * i, "text": r["text"]} for i, r in enumerate(toy_rows(30, 4))]
    rows[3]["time"] = "10 o'clock"
    path = write_csv(tmp_path / "posts.csv", rows)
    assert main(["monitor", "--run", str(run), "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:5 column 'time'" in err and "Traceback" not in err
    assert main(["monitor", "--run", str(run), "--topic-run", str(run), "--input", str(path),
                 "--skip-bad", "--min-count", "1"]) == 0
    out = run / "monitor" / "posts"  # the default folder
    series = read_csv(out / "series.csv")
    # topics are the topic run's labels: here the same run, so shares are 0 and 1
    assert {r["topic"]: float(r["negative_share"]) for r in series} == {
        "negative": 1.0, "positive": 0.0}
    assert sum(int(r["count"]) for r in series) == 29
    report = (out / "report.md").read_text()
    assert "29 texts, 1 skipped rows" in report and f"{path}:5 column 'time'" in report
    assert main(["monitor", "--run", str(run), "--input", str(path),
                 "--negative-label", "bad"]) == 2
    assert "negative, positive" in capsys.readouterr().err


def test_explain_command(run, tmp_path, capsys):
    out = tmp_path / "why"
    assert main(["explain", str(run), "--text", "the film was great", "--text",
                 "a boring plot and very dull acting", "--steps", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1] positive" in printed and "top: great +" in printed
    assert "[2] negative" in printed and "ig delta" in printed
    data = json.loads((out / "explanations.json").read_text())
    assert data["steps"] == 20 and [e["label"] for e in data["explanations"]] == [
        "positive", "negative"]
    assert (out / "explanations.html").exists() and (out / "explanation_002.png").exists()
    assert main(["explain", str(run), "--text", "fine", "--pair", "good", "--method", "gxi",
                 "--label", "negative"]) == 0
    assert "negative" in capsys.readouterr().out
    data = json.loads((run / "explain" / "explanations.json").read_text())  # default folder
    assert data["explanations"][0]["pair_words"] == ["good"] and data["steps"] is None
    assert main(["explain", str(run), "--text", "a", "--text", "b", "--pair", "c"]) == 2
    assert "one --pair per --text" in capsys.readouterr().err


def test_explain_endpoint(run):
    pool = ModelPool()
    pool.add("sentiment", run)
    app = create_app(pool, ServeSettings(max_texts=3, max_chars=60, threads=1))
    texts = ["the film was great", "a dull plot"]
    want = explain(tunelab.load(run), texts, steps=16)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/explain", json={"texts": texts, "steps": 16})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "sentiment" and body["method"] == "ig"
        for got, e in zip(body["explanations"], want):
            assert (got["label"], got["predicted"], got["words"]) == (e.label, e.predicted,
                                                                      e.words)
            assert got["scores"] == pytest.approx(e.word_scores, abs=1e-5)
            assert got["delta"] == pytest.approx(e.delta, abs=1e-5)
        r = client.post("/v1/explain", json={"texts": ["fine"], "text_pairs": ["dull"],
                                             "method": "gxi", "label": "negative"})
        [got] = r.json()["explanations"]
        assert got["label"] == "negative" and got["pair_words"] == ["dull"]
        assert got["delta"] is None
        # classification is served beside it as before
        assert client.post("/v1/classify", json={"texts": texts}).status_code == 200

        def error(body, status, *words):
            r = client.post("/v1/explain", json=body)
            assert r.status_code == status, r.text
            for word in words:
                assert word in r.json()["error"]["message"]

        error({"texts": ["a"], "steps": 1000}, 422, "steps")
        error({"texts": ["a"], "steps": 0}, 422, "steps")
        error({"texts": ["a", "b", "c", "d"]}, 413, "--max-texts")
        error({"texts": ["x" * 61]}, 413, "--max-chars")
        error({"texts": ["a"], "label": "neutral"}, 422, "negative, positive")
        error({"texts": ["a"], "method": "shap"}, 422, "method")
        error({"texts": []}, 422, "empty")
        error({"texts": ["a"], "model": "nope"}, 404, "sentiment")
        error({"texts": ["a", "b"], "text_pairs": ["c"]}, 422, "text_pairs")
        assert 'endpoint="/v1/explain",model="sentiment",status="200"' in client.get(
            "/metrics").text
        assert "/v1/explain" in client.get("/openapi.json").json()["paths"]
