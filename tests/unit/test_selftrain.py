"""Self-training: the loop on a fake learner, the unlabelled file, fewshot-eval's selftrain
method (SetFit on a tiny BERT) and `tunelab self-train` (a tiny training run per round)."""
import json

import numpy as np
import pytest
import yaml
from conftest import toy_rows, write_csv

from tunelab.cli import main
from tunelab.config import DataConfig
from tunelab.errors import ConfigError, DataError
from tunelab.selftrain import (SelfTrainSettings, check_not_test, gold_ids, load_unlabelled,
                               select_confident, self_train, selftrain_settings)


class FakeLearner:
    """Reads its prediction off the text 'LABEL:CONFIDENCE:ID'; records what it was fit on."""

    def __init__(self, fits: list):
        self.fits = fits

    def fit(self, texts, labels):
        self.fits.append((list(texts), list(labels)))
        return self

    def predict_proba(self, texts):
        probs = np.empty((len(texts), 2))
        for row, text in enumerate(texts):
            label, confidence, _ = text.split(":")
            probs[row, int(label)] = float(confidence)
            probs[row, 1 - int(label)] = 1 - float(confidence)
        return probs


def _pile():
    """40 rows the model calls class 0 (confidence 0.60-0.99), 5 it calls class 1 (0.95)."""
    texts = [f"0:{0.60 + 0.01 * i:.2f}:{i}" for i in range(40)]
    return texts + [f"1:0.95:{i}" for i in range(40, 45)]


def test_select_confident_caps_each_class_and_respects_the_threshold():
    probs = np.array([[0.9, 0.1], [0.95, 0.05], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6],
                      [0.99, 0.01]])
    assert select_confident(probs, 0.75, 2) == [(5, 0, 0.99), (1, 0, 0.95), (3, 1, 0.8)]
    assert select_confident(probs, 0.999, 5) == []


def test_rounds_add_balanced_confident_rows_and_report_pseudo_accuracy():
    fits, texts = [], _pile()
    gold = [0] * 40 + [1, 1, 1, 0, None]  # two of the five class-1 calls are not right
    settings = SelfTrainSettings(rounds=2, threshold=0.8, per_class=10, sample_unlabelled=None)
    seen = []
    reports = self_train(lambda r: FakeLearner(fits), ["a", "b"], [0, 1], texts, settings,
                         test=lambda learner: {"accuracy": 0.5 + 0.1 * len(fits)},
                         on_round=lambda report, learner: seen.append(report.round),
                         unlabelled_gold=gold)
    assert [r.round for r in reports] == seen == [0, 1, 2]
    assert len(fits) == 3 and fits[0] == (["a", "b"], [0, 1])  # round 0: labelled rows only
    # round 1: the 10 most confident class-0 rows (0.99 down to 0.90), all 5 class-1 rows
    assert reports[1].added == {0: 10, 1: 5}
    assert sorted(i for i, y, _ in reports[1].added_rows if y == 0) == list(range(30, 40))
    assert reports[1].pseudo_accuracy == round(13 / 14, 4)  # row 44 has no gold label
    # round 2: the next 10 class-0 rows that reach 0.8 (0.89 .. 0.80); class 1 is used up
    assert reports[2].added == {0: 10}
    assert sorted(i for i, _, _ in reports[2].added_rows) == list(range(20, 30))
    assert all(c >= 0.8 for r in reports for _, _, c in r.added_rows)
    assert reports[2].pseudo == 25 and reports[2].labelled == 2
    trained_texts, trained_labels = fits[2]
    assert len(trained_texts) == 27 and trained_texts[:2] == ["a", "b"]
    assert trained_labels.count(1) == 1 + 5 and reports[2].pseudo_accuracy == 1.0
    assert [r.test["accuracy"] for r in reports] == pytest.approx([0.6, 0.7, 0.8])
    assert reports[0].added == {} and reports[0].pseudo_accuracy is None
    assert reports[2].to_dict(["neg", "pos"])["added"] == {"neg": 10}


def test_stops_when_no_row_reaches_the_threshold():
    fits = []
    settings = SelfTrainSettings(rounds=3, threshold=0.995, sample_unlabelled=None)
    reports = self_train(lambda r: FakeLearner(fits), ["a", "b"], [0, 1], _pile(), settings)
    assert len(reports) == 1 and len(fits) == 1
    assert "threshold 0.995" in reports[0].stopped and "0.990" in reports[0].stopped


def test_the_unlabelled_sample_is_capped_and_seeded():
    def added(seed):
        settings = SelfTrainSettings(rounds=1, threshold=0.5, per_class=3, sample_unlabelled=12,
                                     seed=seed)
        reports = self_train(lambda r: FakeLearner([]), ["a", "b"], [0, 1], _pile(), settings)
        assert reports[1].scored == 12
        return [i for i, _, _ in reports[1].added_rows]

    assert added(0) == added(0)
    assert len({tuple(added(s)) for s in range(4)}) > 1


def test_settings_are_validated():
    assert selftrain_settings({"rounds": 1, "unlabelled": "u.csv"}).unlabelled == "u.csv"
    with pytest.raises(ConfigError, match="unknown key selftrain.bogus"):
        selftrain_settings({"bogus": 1})
    for bad in ({"threshold": 1.0}, {"per_class": 0}, {"rounds": -1}, {"sample_unlabelled": 0}):
        with pytest.raises(ConfigError, match="selftrain."):
            selftrain_settings(bad)


def test_unlabelled_file_dedupes_excludes_and_reads_gold_labels(tmp_path):
    rows = [{"sentence": "one", "label": "positive"}, {"sentence": "two", "label": ""},
            {"sentence": "one", "label": "positive"}, {"sentence": "known", "label": "1"}]
    path = write_csv(tmp_path / "u.csv", rows)
    cfg = DataConfig(text_column="sentence")
    pile = load_unlabelled(str(path), cfg, exclude={"known"})
    assert pile.texts == ["one", "two"] and "2 repeated or labelled rows" in pile.source
    assert gold_ids(pile.raw_labels, ["negative", "positive"], False) == [1, None]
    assert gold_ids(["1", "0", None], ["negative", "positive"], True) == [1, 0, None]
    assert gold_ids([None, None], ["negative", "positive"], True) is None
    with pytest.raises(DataError, match="has no column 'text'"):
        load_unlabelled(str(path), DataConfig())
    bad = write_csv(tmp_path / "bad.csv", [{"sentence": "a", "id": 1},
                                           {"sentence": " ", "id": 2}])
    with pytest.raises(DataError, match=r"bad.csv:3 column 'sentence': empty text"):
        load_unlabelled(str(bad), cfg)


def test_the_test_set_is_never_the_unlabelled_file(tmp_path):
    with pytest.raises(ConfigError, match="is the test file"):
        check_not_test("data/../data/test.csv", DataConfig(train="data/train.csv",
                                                           test="data/test.csv"))
    with pytest.raises(ConfigError, match="held out of"):
        check_not_test("pool.csv", DataConfig(train="pool.csv", test_ratio=0.5))
    check_not_test("pool.csv", DataConfig(train="pool.csv", test="test.csv"))


def test_fewshot_eval_selftrain_reports_every_round(tiny_bert, toy_data, tmp_path):
    pool = write_csv(tmp_path / "pool.csv", toy_rows(40, 7))
    recipe = tmp_path / "fewshot.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": tiny_bert, "max_length": 32},
        "data": {"train": str(pool), "test": toy_data["test"]},
        "train": {"tracker": "none", "precision": "fp32", "threads": 1},
        "setfit": {"num_iterations": 2, "lr": 1e-3},
        "selftrain": {"unlabelled": str(pool), "rounds": 1, "threshold": 0.5,
                      "per_class": 3}}))
    out = tmp_path / "fs"
    assert main(["fewshot-eval", str(recipe), "--methods", "selftrain", "--k", "2",
                 "--seeds", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][0]
    assert run["method"] == "selftrain" and [r["round"] for r in run["rounds"]] == [0, 1]
    last = run["rounds"][-1]
    assert sum(last["added"].values()) == last["pseudo"] == 6  # 3 per class
    assert last["pseudo_accuracy"] is not None  # pool.csv carries labels
    assert run["accuracy"] == last["test_accuracy"]
    assert results["selftrain"]["unlabelled"].startswith(str(pool))
    assert "| selftrain | 2 |" in (out / "results.md").read_text()
    assert main(["fewshot-eval", str(recipe), f"selftrain.unlabelled={toy_data['test']}",
                 "--methods", "selftrain", "--k", "2", "--seeds", "0",
                 "--out", str(tmp_path / "leak")]) == 2
    # `pool`: the pool's rows outside the sample, without their labels
    assert main(["fewshot-eval", str(recipe), "selftrain.unlabelled=pool", "--methods",
                 "selftrain", "--k", "2", "--seeds", "0", "--out", str(tmp_path / "pool")]) == 0
    pooled = json.loads((tmp_path / "pool" / "results.json").read_text())
    assert pooled["selftrain"]["unlabelled"].startswith(f"the pool, {pool} (40 rows")
    assert pooled["runs"][0]["rounds"][-1]["pseudo"] == 6
    assert main(["self-train", "--unlabelled", "pool", str(recipe), "--out",
                 str(tmp_path / "st")]) == 2


def test_the_pool_as_unlabelled_rows_keeps_labels_for_reporting_only():
    from types import SimpleNamespace as Row

    from tunelab.selftrain import pool_unlabelled

    pool = [Row(text="a", label=0), Row(text="b", label=1), Row(text="a", label=0)]
    pile = pool_unlabelled(pool, ["neg", "pos"], "pool.csv")
    assert pile.texts == ["a", "b"] and pile.raw_labels == ["neg", "pos"]
    assert pile.source == "the pool, pool.csv (2 rows, labels unused)"


def test_self_train_cli_writes_a_run_per_round(tiny_overrides, tmp_path, capsys):
    unlabelled = write_csv(tmp_path / "unlabelled.csv", toy_rows(60, 9))
    out = tmp_path / "st"
    overrides = tiny_overrides
    code = main(["self-train", *overrides, "--unlabelled", str(unlabelled),
                 "--rounds", "1", "--threshold", "0.5", "--per-class", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rounds = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rounds["rounds"]] == [0, 1]
    assert rounds["final_run"] == str(out / "round-1")
    assert rounds["rounds"][1]["added"] == {"negative": 4, "positive": 4}
    assert rounds["rounds"][1]["pseudo_accuracy"] is not None
    for r in (0, 1):
        results = json.loads((out / f"round-{r}" / "results.json").read_text())
        assert rounds["rounds"][r]["test"]["accuracy"] == results["test"]["accuracy"]
    # round 1 trained on the labelled training rows plus the 8 pseudo-labelled ones
    trained = [json.loads(x) for x in (out / "data" / "round-1-train.jsonl").open()]
    labelled = [json.loads(x) for x in (out / "data" / "round-0-train.jsonl").open()]
    assert len(trained) == len(labelled) + 8
    pseudo = [json.loads(x) for x in (out / "data" / "round-1-pseudo.jsonl").open()]
    assert len(pseudo) == 8 and {"text", "pseudo_label", "confidence", "gold_label"} <= set(
        pseudo[0])
    assert "| 1 | 8 |" in (out / "rounds.md").read_text()
    # the final round is a normal run: `tunelab predict` works on it
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(out / "round-1"), "--input", str(unlabelled),
                 "--output", str(preds)]) == 0
    assert len(preds.read_text().splitlines()) == 61
    assert main(["self-train", *overrides, "--unlabelled", str(unlabelled),
                 "--out", str(out)]) == 2
    assert "already holds a self-training run" in capsys.readouterr().err
