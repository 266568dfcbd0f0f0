"""Token classification end to end on a tiny BERT built in code: training with full and LoRA
reaches a high entity F1 on a learnable toy set, a reloaded run reproduces its numbers and
predictions, raw-text offsets point at the entities, and the CLI verbs work on CoNLL files."""
import csv
import json
import random
from pathlib import Path

import pytest

import tunelab
from tunelab.cli import main
from tunelab.config import resolve_config
from tunelab.train.loop import train

# People are the name(s) after "Mr", places the city after "in": learnable from context.
NAMES = ["Smith", "Jones", "Brown", "Taylor", "Wilson", "Evans", "Thomas", "Walker", "Wright",
         "Green", "Hall", "Moore"]
FIRST = ["Anna", "John", "Mary", "Paul", "Kate"]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Dublin"]
FILLER = ["yesterday", "the", "meeting", "was", "long", "and", "today", "we", "saw", "a",
          "report", "about", "it", "then", "later", "news", "said", "that"]


def toy_sentence(rng):
    words, tags = [], []
    for _ in range(rng.randint(1, 3)):
        for _ in range(rng.randint(0, 3)):
            words.append(rng.choice(FILLER))
            tags.append("O")
        kind = rng.random()
        if kind < 0.35:
            words += ["Mr", rng.choice(NAMES)]
            tags += ["O", "B-PER"]
        elif kind < 0.6:
            words += ["Mr", rng.choice(FIRST), rng.choice(NAMES)]
            tags += ["O", "B-PER", "I-PER"]
        else:
            words += ["in", rng.choice(CITIES)]
            tags += ["O", "B-LOC"]
    return words, tags


def write_conll(path, n, seed):
    """`token TAG 0` lines like the shared CoNLL-2003 files."""
    rng = random.Random(seed)
    lines = ["-DOCSTART- O 0", ""]
    for _ in range(n):
        words, tags = toy_sentence(rng)
        lines += [f"{w} {t} 0" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def ner_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ner")
    return {"train": write_conll(d / "train.txt", 200, 1),
            "validation": write_conll(d / "valid.txt", 30, 2),
            "test": write_conll(d / "test.txt", 40, 3)}


@pytest.fixture(scope="module")
def ner_bert(tmp_path_factory):
    from tunelab.tiny import build_tiny_model

    rng = random.Random(0)
    texts = [" ".join(toy_sentence(rng)[0]) for _ in range(200)]
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", kind="bert",
                                texts=texts, vocab_size=200, hidden=64, intermediate=128))


def overrides(ner_bert, ner_files, run_dir):
    return ["task=token_classification", f"model.name={ner_bert}",
            f"data.train={ner_files['train']}", f"data.validation={ner_files['validation']}",
            f"data.test={ner_files['test']}", "train.batch_size=8", "train.precision=fp32",
            "train.threads=1", "train.tracker=none", "model.max_length=32",
            "train.warmup_ratio=0.0", f"run_dir={run_dir}"]


METHODS = {"full": ["method.name=full", "train.lr=3e-3", "train.epochs=20"],
           "lora": ["method.name=lora", "method.dropout=0.0", "train.lr=1e-2",
                    "train.epochs=25"]}


@pytest.fixture(scope="module", params=sorted(METHODS))
def trained(request, ner_bert, ner_files, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    config = resolve_config(overrides=overrides(ner_bert, ner_files, run_dir)
                            + METHODS[request.param])
    return request.param, train(config, quiet=True)


def test_training_reaches_high_entity_f1(trained):
    method, run = trained
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["f1"] >= 0.9, results["test"]
    assert results["test"]["f1_PER"] > 0.8 and results["test"]["f1_LOC"] > 0.8
    assert (run / ("model" if method == "full" else "adapter")).is_dir()
    assert json.loads((run / "label_map.json").read_text()) == {
        "0": "O", "1": "B-LOC", "2": "B-PER", "3": "I-LOC", "4": "I-PER"}
    preflight = json.loads((run / "preflight.json").read_text())
    assert preflight["scheme"] == "IOB2" and preflight["splits"]["train"]["sentences"] == 200
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in logs if "split" not in r]
    assert train_losses[-1] < train_losses[0] * 0.5


def test_reloaded_run_reproduces_metrics_and_predictions(trained, ner_files):
    _, run = trained
    results = json.loads((run / "results.json").read_text())["test"]
    predictor = tunelab.load(run)
    metrics, tracker, problems = predictor.evaluate_file(ner_files["test"])
    assert problems == []
    for key in ("f1", "precision", "recall", "token_accuracy", "entities"):
        assert metrics[key] == results[key], key
    assert metrics["loss"] == pytest.approx(results["loss"], abs=1e-6)
    texts = ["yesterday Mr John Smith said that the meeting in Paris was long",
             "today we saw Mr Wright"]
    first = predictor.predict(texts)
    assert tunelab.load(run).predict(texts) == first  # save -> load: identical, scores too
    found = {(e["type"], e["text"]) for e in first[0]["entities"]}
    assert found == {("PER", "John Smith"), ("LOC", "Paris")}, first[0]
    for text, pred in zip(texts, first):
        for e in pred["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
        assert len(pred["words"]) == len(pred["tags"])


def test_long_inputs_are_tagged_in_windows(trained):
    _, run = trained
    predictor = tunelab.load(run)
    words = ["the", "report", "was", "long", "and"] * 12 + ["Mr", "Walker"]  # 62 words > 32
    [pred] = predictor.predict_words([words])
    assert len(pred["tags"]) == len(words)
    assert {"type": "PER", "text": "Walker", "start": 61, "end": 62} == {
        k: v for k, v in pred["entities"][-1].items() if k != "score"}


def test_cli_check_train_eval_predict(ner_bert, ner_files, tmp_path, capsys):
    args = overrides(ner_bert, ner_files, tmp_path / "run") + METHODS["full"]
    assert main(["check", *args]) == 0
    out = capsys.readouterr().out
    assert "Data: 5 tags (IOB2), 2 entity types" in out
    assert "/B-PER" in out and "[CLS]/-" in out  # the example shows what the loss reads
    assert main(["train", *args]) == 0
    run = tmp_path / "run"
    capsys.readouterr()

    assert main(["eval", str(run), "--data", ner_files["test"]]) == 0
    out = capsys.readouterr().out
    assert "entity F1" in out and "micro avg" in out and "LOC" in out
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert metrics["f1"] == results["test"]["f1"] and metrics["skipped"] == 0
    assert set(metrics["per_type"]) == {"LOC", "PER"}

    out_file = tmp_path / "pred.jsonl"
    assert main(["predict", str(run), "--input", ner_files["test"],
                 "--output", str(out_file)]) == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 40 and rows[0]["line"] == 3
    for row in rows:
        for e in json.loads(row["entities"]):
            assert row["text"][e["start"]:e["end"]] == e["text"]
    assert sum(len(json.loads(r["entities"])) for r in rows) >= 40

    texts = tmp_path / "texts.csv"
    with open(texts, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "text"], ["a", "later Mr Kate Green said it"],
                                 ["b", "news about Oslo"]])
    tagged = tmp_path / "tagged.csv"
    assert main(["predict", str(run), "--input", str(texts), "--output", str(tagged)]) == 0
    with open(tagged, encoding="utf-8") as f:
        out_rows = list(csv.DictReader(f))
    assert [r["id"] for r in out_rows] == ["a", "b"]
    entities = json.loads(out_rows[0]["entities"])
    assert [(e["type"], e["text"], e["start"]) for e in entities] == [("PER", "Kate Green", 9)]


def test_cli_reports_bad_data_without_traceback(ner_bert, tmp_path, capsys):
    train_file = Path(tmp_path / "train.txt")
    train_file.write_text("John NNP 1\nlives VBZ 2\n", encoding="utf-8")
    assert main(["check", "task=token_classification", f"model.name={ner_bert}",
                 f"data.train={train_file}"]) == 2
    assert "no column of tags found" in capsys.readouterr().err
