"""`tunelab search` and `tunelab runs` end to end on the tiny BERT: trials, pruning, a study
shared by two processes, run status, listing, diffs, curves, reproducibility, trackers."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tunelab import experiments, runs
from tunelab.cli import main
from tunelab.config import resolve_config
from tunelab.train.loop import train

TIMING = {"samples_per_s", "tokens_per_s", "seconds", "peak_rss_mb"}


@pytest.fixture
def recipe(tiny_bert, toy_data, tmp_path):
    """The tiny model learns the toy set within ~40 steps at lr 2e-3; evaluation every 10."""
    tree = {"model": {"name": tiny_bert, "max_length": 32},
            "data": {"train": toy_data["train"], "validation": toy_data["validation"],
                     "test": toy_data["test"]},
            "method": {"name": "full"},
            "train": {"lr": 2e-3, "batch_size": 4, "epochs": 12, "eval_every": 10,
                      "log_every": 5, "precision": "fp32", "threads": 1, "tracker": "none",
                      "warmup_ratio": 0.0}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without(record: dict, keys) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


# -- search -----------------------------------------------------------------------------------


def test_search_writes_trials_best_recipe_and_plots(recipe, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 5e-4, high: 5e-3, log: true}\n"
                     "method.name: [full, lora]\nmethod.r: [2, 4]\n")
    out = tmp_path / "search"
    args = ["search", recipe, "train.epochs=8", "--space", str(space), "--out", str(out),
            "--seed", "1", "--pruner", "none"]
    assert main([*args, "--trials", "3"]) == 0
    rows = read_csv(out / "trials.csv")
    assert [r["state"] for r in rows] == ["complete"] * 3
    for r in rows:
        run = Path(r["run_dir"])
        results = json.loads((run / "results.json").read_text())
        assert float(r["value"]) == results["validation"]["accuracy"]
        config = resolve_config(run / "config.yaml")
        assert config.method.name == r["method.name"] and config.train.lr == float(r["train.lr"])
        assert config.train.epochs == 8  # the command-line override reaches every trial
        assert (r["method.r"] == "") == (r["method.name"] == "full")  # r only for LoRA
        assert experiments.status_of(run) == "finished"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["metric"], summary["direction"]) == ("accuracy", "maximize")
    assert summary["trials"] == {"complete": 3}
    best = summary["best"]
    assert best["value"] == max(float(r["value"]) for r in rows)
    for plot in ("history.png", "intermediate.png", "importance.png"):
        assert (out / plot).stat().st_size > 5000, plot
    assert "(best)" in (out / "trials.md").read_text() and "best recipe" in capsys.readouterr().out

    # best.yaml is a ready recipe: training it again gives the best trial's result exactly
    best_config = resolve_config(out / "best.yaml")
    assert best_config.run_dir is None and best_config.train.lr == best["params"]["train.lr"]
    assert main(["train", str(out / "best.yaml"), f"run_dir={tmp_path / 'again'}"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["validation"]["accuracy"] == best["value"]

    # the same command continues the study stored in OUT/study.db
    assert main([*args, "--trials", "1"]) == 0
    assert [r["trial"] for r in read_csv(out / "trials.csv")] == ["0", "1", "2", "3"]
    assert (out / "trials" / "trial-003" / "results.json").is_file()


@pytest.mark.parametrize("pruner", ["median", "asha"])
def test_pruner_stops_a_trial_with_a_bad_learning_rate(recipe, tmp_path, pruner):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 1e-4, high: 1.0, log: true}\n")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="prune", direction="minimize")
    for lr in (2e-3, 3e-3, 0.5):  # lr 0.5 sends the validation loss above 5 at once
        study.enqueue_trial({"train.lr": lr})
    out = tmp_path / "out"
    assert main(["search", recipe, "train.metric=loss", "--space", str(space), "--trials", "3",
                 "--storage", storage, "--study", "prune", "--pruner", pruner,
                 "--startup-trials", "2", "--out", str(out)]) == 0
    trials = optuna.load_study(study_name="prune", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    bad = Path(trials[2].user_attrs["run_dir"])
    assert trials[2].last_step == 10  # pruned at its first evaluation
    # the pruned run is consistent: logged and checkpointed up to that evaluation, marked pruned
    assert experiments.status_of(bad) == "pruned"
    assert "pruned at step 10" in experiments.read_status(bad)["error"]
    assert not (bad / "results.json").exists()
    assert runs.latest_checkpoint(bad).name == "checkpoint-10"
    assert max(r["step"] for r in read_jsonl(bad / "metrics.jsonl")) == 10
    rows = {r["trial"]: r for r in read_csv(out / "trials.csv")}
    assert rows["2"]["state"] == "pruned" and rows["2"]["step"] == "10"


def test_two_processes_share_one_study(recipe, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 1e-3, high: 3e-3}\n")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    command = [sys.executable, "-m", "tunelab", "search", recipe, "train.epochs=2", "--space",
               str(space), "--trials", "1", "--storage", storage, "--study", "shared",
               "--pruner", "none", "--out", str(tmp_path / "out")]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # one trial from each process
    for t in trials:
        assert (Path(t.user_attrs["run_dir"]) / "results.json").is_file()


# -- runs -------------------------------------------------------------------------------------


def test_runs_list_show_diff_and_compare(tiny_overrides, tmp_path, capsys):
    base = [o for o in tiny_overrides if not o.startswith("run_dir=")] + ["train.epochs=4",
                                                                          "train.eval_every=5"]
    root = tmp_path / "runs"
    assert main(["train", *base, f"run_dir={root / 'a'}"]) == 0
    assert main(["train", *base, "train.lr=3e-3", f"run_dir={root / 'b'}"]) == 0

    def fail(step, metrics):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        train(resolve_config(overrides=[*base, f"run_dir={root / 'c'}"]), quiet=True,
              on_evaluate=fail)
    capsys.readouterr()

    assert main(["runs", "list", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["run", "status"]
    table = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(table) == {"a", "b", "c"}
    assert table["a"][1] == "finished" and table["c"][1] == "failed"
    results = json.loads((root / "a" / "results.json").read_text())
    assert f"{results['test']['accuracy']:.4f}" in table["a"] and "20/20" in table["a"]
    assert "5/20" in table["c"]

    assert main(["runs", "show", str(root / "c")]) == 0
    shown = capsys.readouterr().out
    assert "failed: RuntimeError: disk full" in shown and "resumable from checkpoint-5" in shown
    assert f"continue it: tunelab train --resume {root / 'c'}" in shown

    assert main(["runs", "diff", str(root / "a"), str(root / "b")]) == 0
    diff = capsys.readouterr().out
    config_part = diff.split("config:")[1].split("environment:")[0]
    assert [line.split()[0] for line in config_part.strip().splitlines()[1:]] == ["train.lr"]
    assert "0.001" in config_part and "0.003" in config_part

    png = tmp_path / "curves.png"
    assert main(["runs", "compare", str(root / "a"), str(root / "b"), "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    assert png.stat().st_size > 10000
    val = [r["accuracy"] for r in read_jsonl(root / "b" / "metrics.jsonl")
           if r.get("split") == "validation"]
    assert f"b: best validation accuracy {max(val):.4f}" in printed
    assert main(["runs", "compare", str(root / "a"), "--metric", "loss", "--out", str(png)]) == 0
    assert "best validation loss" in capsys.readouterr().out
    assert main(["runs", "compare", str(root / "a"), "--metric", "bleu", "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert "no run logged a validation 'bleu'" in err and "accuracy" in err


def test_status_while_running_then_interrupted_then_resumed(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    seen = []

    def stop_at_ten(step, metrics):
        seen.append((step, experiments.status_of(run), experiments.summarize(run)["validation"]))
        if step == 10:
            raise KeyboardInterrupt

    config = resolve_config(overrides=[*tiny_overrides, "train.eval_every=5"])
    with pytest.raises(KeyboardInterrupt):
        train(config, quiet=True, on_evaluate=stop_at_ten)
    assert [(step, status) for step, status, _ in seen] == [(5, "running"), (10, "running")]
    assert seen[0][2] == read_jsonl(run / "metrics.jsonl")[1]["accuracy"]  # best so far
    assert experiments.status_of(run) == "interrupted"
    assert runs.latest_checkpoint(run).name == "checkpoint-10"
    assert main(["train", "--resume", str(run)]) == 0
    assert experiments.status_of(run) == "finished"
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "split" not in r]
    assert steps == sorted(set(steps)) and steps[-1] == 100


# -- reproducibility --------------------------------------------------------------------------


def test_same_recipe_and_seed_give_identical_metrics(tiny_overrides, toy_data, tmp_path):
    base = [o for o in tiny_overrides if not o.startswith("run_dir=")] + ["method.name=lora",
                                                                          "train.epochs=6"]
    for name in ("a", "b"):
        assert main(["train", *base, f"run_dir={tmp_path / name}"]) == 0
    a, b = (read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("a", "b"))
    assert [without(r, TIMING) for r in a] == [without(r, TIMING) for r in b]
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("a", "b"))
    assert ra["validation"] == rb["validation"] and ra["test"] == rb["test"]
    ea, eb = (json.loads((tmp_path / n / "env.json").read_text()) for n in ("a", "b"))
    assert ea["config_hash"] == eb["config_hash"] and len(ea["config_hash"]) == 16
    assert ea["data_hashes"] == eb["data_hashes"]
    assert set(ea["data_hashes"]) == {"train", "validation", "test"}
    assert ea["data_hashes"]["train"] == runs.file_hash(toy_data["train"])
    # what changes the result changes a hash
    changed = tmp_path / "train.csv"
    changed.write_text(Path(toy_data["train"]).read_text().replace("good", "fine"))
    config = resolve_config(overrides=[*base, f"data.train={changed}"])
    assert runs.environment(config, {})["data_hashes"]["train"] != ea["data_hashes"]["train"]
    assert resolve_config(overrides=[*base, "train.lr=2e-3"]).hash() != ea["config_hash"]


# -- trackers ---------------------------------------------------------------------------------


def without_tracker(overrides):
    return [o for o in overrides if o != "train.tracker=none"]


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_missing_tracker_fails_before_writing_the_run(tiny_overrides, tmp_path, capsys, tracker,
                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed: import fails
    assert main(["train", *without_tracker(tiny_overrides), f"train.tracker={tracker}"]) == 2
    assert f"pip install {tracker}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("uri", ["sqlite", "file"])
def test_mlflow_logs_to_a_local_store(tiny_overrides, tmp_path, uri):
    mlflow = pytest.importorskip("mlflow")
    store = (f"sqlite:///{tmp_path / 'mlflow.db'}" if uri == "sqlite"
             else (tmp_path / "mlruns").as_uri())
    assert main(["train", *without_tracker(tiny_overrides), "train.epochs=2",
                 "train.tracker=mlflow", f"train.tracker_uri={store}"]) == 0
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    [run] = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.run_name == "run" and run.data.params["train.lr"] == "0.001"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [5, 10]


def test_wandb_offline_needs_no_account(tiny_overrides, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert main(["train", *without_tracker(tiny_overrides), "train.epochs=2",
                 "train.tracker=wandb"]) == 0
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))
