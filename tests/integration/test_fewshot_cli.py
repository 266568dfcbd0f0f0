"""`tunelab zeroshot` and `tunelab fewshot-eval` end to end on a tiny BERT."""
import csv
import json

import numpy as np
import yaml
from conftest import toy_rows, write_csv

from tunelab.cli import main


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_zeroshot_writes_predictions_and_metrics(tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "zs"
    labels = tmp_path / "labels.yaml"
    labels.write_text("positive: [good, great]\nnegative: [bad, awful]\n")
    code = main(["zeroshot", "--model", tiny_bert, "--data", toy_data["test"], "--label-file",
                 str(labels), "--template", "it was {}", "--aggregate", "mean", "--out", str(out)])
    assert code == 0
    rows = _read_csv(out / "predictions.csv")
    inputs = _read_csv(toy_data["test"])
    assert len(rows) == len(inputs) == 24
    assert [r["text"] for r in rows] == [r["text"] for r in inputs]  # input columns kept
    for r in rows:
        assert r["predicted_label"] in ("positive", "negative")
        scores = float(r["score_positive"]), float(r["score_negative"])
        assert abs(sum(scores) - 1) < 1e-4 and float(r["score"]) == max(scores)
    metrics = json.loads((out / "metrics.json").read_text())
    accuracy = np.mean([r["predicted_label"] == r["label"] for r in rows])
    assert metrics["n"] == 24 and abs(metrics["accuracy"] - accuracy) < 1e-9
    assert (out / "confusion_zeroshot.png").is_file()
    described = json.loads((out / "zeroshot.json").read_text())
    assert described["templates"] == ["it was {}"] and described["scorer"] == "similarity"
    assert "accuracy" in capsys.readouterr().out


def test_zeroshot_without_labels_and_with_wrong_labels(tiny_bert, tmp_path, capsys):
    texts = write_csv(tmp_path / "texts.csv", [{"text": r["text"]} for r in toy_rows(6, 0)])
    out = tmp_path / "plain"
    assert main(["zeroshot", "--model", tiny_bert, "--data", str(texts), "--labels",
                 "positive,negative", "--out", str(out), "--output",
                 str(tmp_path / "p.jsonl")]) == 0
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 6 and "predicted_label" in json.loads(lines[0])
    assert not (out / "metrics.json").exists()
    labelled = write_csv(tmp_path / "l.csv", toy_rows(6, 0))
    assert main(["zeroshot", "--model", tiny_bert, "--data", str(labelled), "--labels",
                 "good,bad", "--out", str(tmp_path / "x")]) == 2
    assert "unknown label" in capsys.readouterr().err
    assert main(["zeroshot", "--model", tiny_bert, "--data", str(labelled), "--out",
                 str(tmp_path / "y")]) == 2


def _recipe(tmp_path, tiny_bert, toy_data):
    pool = write_csv(tmp_path / "pool.csv", toy_rows(40, 7))
    recipe = tmp_path / "fewshot.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": tiny_bert, "max_length": 32},
        "data": {"train": str(pool), "test": toy_data["test"]},
        "train": {"lr": 1e-3, "tracker": "none", "precision": "fp32", "threads": 1},
        "setfit": {"num_iterations": 2, "lr": 1e-3},
        "finetune": {"epochs": 2}}))
    return recipe


def test_fewshot_eval_reports_mean_and_std_over_seeds(tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "fs"
    recipe = _recipe(tmp_path, tiny_bert, toy_data)
    code = main(["fewshot-eval", str(recipe), "setfit.batch_size=8",
                 'zeroshot.templates=["this film was {}"]', "--methods",
                 "setfit,finetune,zeroshot", "--k", "4", "--seeds", "0,1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["setfit"]["batch_size"] == 8 and results["finetune"]["epochs"] == 2
    assert results["setfit"]["max_length"] == 32  # the recipe's model.max_length by default
    assert results["zeroshot"]["templates"] == ["this film was {}"]
    runs = results["runs"]
    assert [(r["method"], r["k"], r["seed"]) for r in runs] == [
        ("setfit", 4, 0), ("setfit", 4, 1), ("finetune", 4, 0), ("finetune", 4, 1),
        ("zeroshot", 0, None)]
    summary = {(s["method"], s["k"]): s for s in results["summary"]}
    for method in ("setfit", "finetune"):
        accs = [r["accuracy"] for r in runs if r["method"] == method]
        s = summary[(method, 4)]
        assert s["seeds"] == 2
        assert s["accuracy_mean"] == round(float(np.mean(accs)), 4)
        assert s["accuracy_std"] == round(float(np.std(accs, ddof=1)), 4)
    assert summary[("zeroshot", 0)]["seeds"] == 1 and summary[("zeroshot", 0)]["accuracy_std"] == 0
    # each seed drew its own sample, and each fine-tuning run wrote its run directory
    assert (out / "data" / "k4-seed0.jsonl").read_text() != \
        (out / "data" / "k4-seed1.jsonl").read_text()
    assert len((out / "data" / "k4-seed0.jsonl").read_text().splitlines()) == 8
    for seed in (0, 1):
        run = out / "runs" / f"finetune-k4-seed{seed}"
        test = json.loads((run / "results.json").read_text())["test"]
        row = next(r for r in runs if r["method"] == "finetune" and r["seed"] == seed)
        assert test["accuracy"] == row["accuracy"]
    table = (out / "results.md").read_text()
    assert "| setfit | 4 |" in table and "±" in table
    assert (out / "results.png").stat().st_size > 5000
    assert "| finetune | 4 |" in capsys.readouterr().out


def test_fewshot_eval_refuses_impossible_k_and_unknown_keys(tiny_bert, toy_data, tmp_path,
                                                             capsys):
    recipe = _recipe(tmp_path, tiny_bert, toy_data)
    assert main(["fewshot-eval", str(recipe), "--methods", "setfit", "--k", "50",
                 "--out", str(tmp_path / "a")]) == 2
    assert "has 20 examples; 50 per class" in capsys.readouterr().err
    assert not (tmp_path / "a" / "results.json").exists()
    assert main(["fewshot-eval", str(recipe), "setfit.iterations=3", "--k", "2",
                 "--out", str(tmp_path / "b")]) == 2
    assert "unknown key setfit.iterations" in capsys.readouterr().err
    assert main(["fewshot-eval", str(recipe), "--methods", "setfit,prompting",
                 "--out", str(tmp_path / "c")]) == 2
    assert "unknown few-shot method 'prompting'" in capsys.readouterr().err


def test_fewshot_eval_resumes_extends_and_refuses_other_settings(tiny_bert, toy_data, tmp_path,
                                                                  capsys):
    out = tmp_path / "fs"
    recipe = _recipe(tmp_path, tiny_bert, toy_data)
    args = ["fewshot-eval", str(recipe), "--methods", "setfit", "--k", "4", "--out", str(out)]
    assert main([*args, "--seeds", "0,1"]) == 0
    first = json.loads((out / "results.json").read_text())["runs"]
    capsys.readouterr()
    # a third seed (as after a stop, or to extend): seeds 0 and 1 are kept, not run again
    assert main([*args, "--seeds", "0,1,2"]) == 0
    assert "setfit k=4 seed=0: kept from the earlier run" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["runs"][:2] == first and [r["seed"] for r in results["runs"]] == [0, 1, 2]
    assert results["seeds"] == [0, 1, 2] and results["summary"][0]["seeds"] == 3
    # another method joins the same table; the earlier setfit runs stay in it
    assert main(["fewshot-eval", str(recipe), "--methods", "zeroshot", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["setfit"] * 3 + ["zeroshot"]
    assert results["methods"] == ["setfit", "zeroshot"]
    # other settings for a method with earlier runs: refused, naming what changed
    assert main([*args, "--seeds", "0", "setfit.num_iterations=3"]) == 2
    err = capsys.readouterr().err
    assert "setfit settings" in err and "num_iterations: 2 before, 3 now" in err
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
    # results without recorded settings (an older tunelab) are not extended
    legacy = json.loads((out / "results.json").read_text())
    del legacy["settings"]
    (out / "results.json").write_text(json.dumps(legacy))
    assert main([*args, "--seeds", "0"]) == 2
    assert "does not record the settings of its runs" in capsys.readouterr().err
    # --fresh replaces them
    assert main([*args, "--seeds", "0", "setfit.num_iterations=3", "--fresh"]) == 0
    assert [(r["method"], r["seed"]) for r in
            json.loads((out / "results.json").read_text())["runs"]] == [("setfit", 0)]


def test_finetune_runs_resume_across_dropout_streams_but_not_other_settings(
        tiny_bert, toy_data, tmp_path, capsys):
    """train.fast_dropout draws the same dropout from another random stream: not a setting
    that makes earlier finetune runs another experiment; the learning rate is one."""
    out = tmp_path / "fs"
    args = ["fewshot-eval", str(_recipe(tmp_path, tiny_bert, toy_data)), "--methods",
            "finetune", "--k", "4", "--seeds", "0", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "train.fast_dropout=false"]) == 0
    assert "finetune k=4 seed=0: kept from the earlier run" in capsys.readouterr().err
    assert main([*args, "train.lr=0.003"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_fewshot_eval_zeroshot_with_an_nli_run(tiny_bert, toy_data, tmp_path):
    pairs = write_csv(tmp_path / "nli.csv", [
        {"text": r["text"], "hypothesis": f"This example is {r['label']}.",
         "label": "entailment" if i % 2 else "not_entailment"}
        for i, r in enumerate(toy_rows(16, 3))])
    run = tmp_path / "nli-run"
    assert main(["train", f"model.name={tiny_bert}", f"data.train={pairs}",
                 "data.text_pair_column=hypothesis", "train.max_steps=2", "train.tracker=none",
                 "train.precision=fp32", "train.threads=1", "model.max_length=32",
                 f"run_dir={run}"]) == 0
    out = tmp_path / "fs"
    recipe = _recipe(tmp_path, tiny_bert, toy_data)
    assert main(["fewshot-eval", str(recipe), f"model.name={run}", "zeroshot.scorer=nli",
                 "--methods", "zeroshot", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["zeroshot"]["scorer"] == "nli" and results["model"] == str(run)
    assert results["runs"][0]["method"] == "zeroshot" and 0 <= results["runs"][0]["accuracy"] <= 1
