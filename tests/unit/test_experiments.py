"""Run status, run discovery, config diffs, the search space and the study set-up, without
training (tests/integration/test_runs_and_search.py trains)."""
import json
import socket
import sys

import optuna
import pytest
import yaml

from tunelab import experiments, search
from tunelab.config import resolve_config
from tunelab.errors import ConfigError, TunelabError


def fake_run(path, config: dict | None = None, env: dict | None = None):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config or {"method": {"name": "full"}}))
    (path / "env.json").write_text(json.dumps(env or {}))
    return path


class FakeTracker:
    def __init__(self):
        self.finished = 0

    def finish(self):
        self.finished += 1


class FakeAccelerator:
    is_main_process = True

    def __init__(self):
        self.trackers = [FakeTracker()]


# -- status -----------------------------------------------------------------------------------


def test_running_holds_the_lock_and_records_each_outcome(tmp_path):
    run = fake_run(tmp_path / "run")
    acc = FakeAccelerator()
    with experiments.running(run, acc):
        assert experiments.status_of(run) == "running"
        assert experiments.read_status(run)["pid"] > 0
        with pytest.raises(TunelabError, match="being trained by another process"):
            experiments.acquire_lock(run)
    assert experiments.read_status(run)["status"] == "finished"
    assert experiments.status_of(run) == "finished" and not experiments.is_locked(run)
    started = experiments.read_status(run)["started"]

    with pytest.raises(RuntimeError):
        with experiments.running(run, acc):
            raise RuntimeError("loss is nan")
    status = experiments.read_status(run)
    assert status["status"] == "failed" and status["error"] == "RuntimeError: loss is nan"
    assert status["started"] == started  # a resumed run keeps its first start
    assert acc.trackers[0].finished == 1  # tracker runs are closed on a failure
    assert experiments.status_of(run) == "failed" and not experiments.is_locked(run)

    with pytest.raises(KeyboardInterrupt):
        with experiments.running(run, acc):
            raise KeyboardInterrupt
    assert experiments.status_of(run) == "interrupted"
    (run / "results.json").write_text("{}")
    assert experiments.status_of(run) == "finished"


def test_status_of_a_run_that_left_no_status(tmp_path):
    killed = fake_run(tmp_path / "killed")
    experiments.write_status(killed, status="running", host=socket.gethostname(), pid=1)
    assert experiments.status_of(killed) == "interrupted"  # lock free: the process died
    elsewhere = fake_run(tmp_path / "elsewhere")
    experiments.write_status(elsewhere, status="running", host="another-machine", pid=1)
    assert experiments.status_of(elsewhere) == "running"  # its lock is not ours to check
    old = fake_run(tmp_path / "old")
    assert experiments.status_of(old) == "failed"  # never logged a step
    (old / "metrics.jsonl").write_text('{"step": 5, "loss": 0.7}\n')
    assert experiments.status_of(old) == "interrupted"


def test_a_pruned_run_keeps_its_reason(tmp_path):
    run = fake_run(tmp_path / "run")
    experiments.set_status(run, "pruned", error="pruned at step 30")
    assert experiments.status_of(run) == "pruned"
    assert experiments.read_status(run)["error"] == "pruned at step 30"


# -- reading runs -----------------------------------------------------------------------------


def test_find_runs_does_not_descend_into_a_run(tmp_path):
    fake_run(tmp_path / "a")
    fake_run(tmp_path / "a" / "export" / "merged")  # inside a run: not listed
    fake_run(tmp_path / "search" / "trials" / "trial-000")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.yaml").write_text("x: 1\n")  # no env.json: not a run
    found = sorted(p.relative_to(tmp_path).as_posix() for p in experiments.find_runs(tmp_path))
    assert found == ["a", "search/trials/trial-000"]
    with pytest.raises(TunelabError, match="is not a folder"):
        experiments.find_runs(tmp_path / "missing")


def test_read_metrics_skips_a_cut_last_line_but_not_a_broken_middle(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert experiments.read_metrics(run) == [{"step": 1, "loss": 1.0}]
    (run / "metrics.jsonl").write_text('{"step": 1\n{"step": 2, "loss": 0.5}\n')
    with pytest.raises(TunelabError, match=r"metrics.jsonl:1 is not valid JSON"):
        experiments.read_metrics(run)


def test_summary_of_a_stopped_run_shows_its_best_validation_so_far(tmp_path):
    run = fake_run(tmp_path / "run", {"task": "classification", "train": {"metric": "loss"},
                                      "model": {"name": "minilm"}, "method": {"name": "lora"}},
                   {"total_steps": 100})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "loss": 0.9}, {"step": 10, "split": "validation", "loss": 0.8},
        {"step": 20, "split": "validation", "loss": 0.6},
        {"step": 30, "split": "validation", "loss": 0.7}]) + "\n")
    row = experiments.summarize(run)
    assert (row["metric"], row["validation"], row["steps"]) == ("loss", 0.6, 30)
    assert row["status"] == "interrupted" and row["method"] == "lora"
    table = experiments.format_runs([row], tmp_path)
    assert "30/100" in table and "0.6000" in table and "interrupted" in table


def test_config_diff_lists_only_differing_dotted_keys(tmp_path):
    a = fake_run(tmp_path / "a", {"run_dir": "a", "train": {"lr": 1e-4, "seed": 1},
                                  "method": {"name": "lora", "r": 8}},
                 {"torch": "2.1", "created": "x", "data_hashes": {"train": "aa"}})
    b = fake_run(tmp_path / "b", {"run_dir": "b", "train": {"lr": 3e-4, "seed": 1},
                                  "method": {"name": "full"}},
                 {"torch": "2.1", "created": "y", "data_hashes": {"train": "bb"}})
    assert experiments.config_diff(a, b) == [("method.name", "lora", "full"),
                                             ("method.r", 8, experiments.UNSET),
                                             ("train.lr", 1e-4, 3e-4)]
    assert experiments.env_diff(a, b) == [("data_hashes.train", "aa", "bb")]
    text = experiments.format_diff(a, b)
    assert "train.lr" in text and "run_dir" not in text and "created" not in text


# -- search space -----------------------------------------------------------------------------


def write(path, text):
    path.write_text(text)
    return path


def test_space_file_parses_every_type(tmp_path):
    space = search.load_space(write(tmp_path / "s.yaml", (
        "train.lr: {type: float, low: 1e-5, high: 1e-3, log: true}\n"
        "train.batch_size: {type: int, low: 8, high: 32, step: 8}\n"
        "method.r: [4, 8, 16]\n"
        "method.name: {type: categorical, choices: [lora, ia3]}\n")))
    assert [p.key for p in space] == ["method.name", "train.lr", "train.batch_size", "method.r"]
    lr = space[1]
    assert (lr.low, lr.high, lr.log) == (1e-5, 1e-3, True)  # YAML's '1e-5' string read as float
    assert space[3].type == "categorical" and space[3].choices == [4, 8, 16]
    assert space[1].where.endswith("s.yaml:1")


@pytest.mark.parametrize("text, message", [
    ("train.lr: {type: gaussian, low: 1, high: 2}\n", r"s.yaml:1: train.lr: type must be one"),
    ("method.r: [4]\ntrain.lr: {type: float, low: 1e-3, high: 1e-5}\n",
     r"s.yaml:2: train.lr: low \(0.001\) must be below high"),
    ("train.lr: {type: float, low: 0, high: 1, log: true}\n", "log needs low > 0"),
    ("train.lr: {type: float, low: 0.1, high: 1, sigma: 2}\n", "unknown field 'sigma'"),
    ("train.batch_size: {type: int, low: 1.5, high: 8}\n", "whole number"),
    ("method.r: {type: categorical, choices: []}\n", "non-empty list"),
    ("- train.lr\n", "maps config keys to distributions"),
])
def test_space_file_errors_name_the_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        search.load_space(write(tmp_path / "s.yaml", text))


def test_check_space_rejects_keys_the_config_lacks(tmp_path):
    base = {"method": {"name": "lora"}}
    bad_key = search.load_space(write(tmp_path / "a.yaml", "train.lrr: [1, 2]\n"))
    with pytest.raises(ConfigError, match=r"a.yaml:1: train.lrr=1: unknown key train.lrr"):
        search.check_space(base, bad_key)
    no_method_has_r = search.load_space(write(tmp_path / "b.yaml",
                                              "method.name: [ia3, bitfit]\nmethod.r: [4]\n"))
    with pytest.raises(ConfigError, match=r"b.yaml:2: method.r: no method searched"):
        search.check_space(base, no_method_has_r)
    bad_value = search.load_space(write(tmp_path / "c.yaml", "method.r: [8, 0]\n"))
    with pytest.raises(ConfigError, match=r"method.r=0: method.r must be positive"):
        search.check_space(base, bad_value)
    unknown_method = search.load_space(write(tmp_path / "d.yaml", "method.name: [lora, nope]\n"))
    with pytest.raises(ConfigError, match=r"d.yaml:1: method.name='nope'.*unknown method"):
        search.check_space(base, unknown_method)


def test_drawn_method_decides_which_method_settings_apply(tmp_path):
    space = search.load_space(write(tmp_path / "s.yaml",
                                    "method.name: [lora, full]\nmethod.r: [4, 16]\n"))
    base = {"method": {"name": "lora", "r": 8, "alpha": 32}, "train": {"lr": 1e-3}}
    study = optuna.create_study()
    study.enqueue_trial({"method.name": "full", "method.r": 4})
    study.enqueue_trial({"method.name": "lora", "method.r": 16})
    drawn = [search.draw(study.ask(), space, base) for _ in range(2)]
    assert drawn == [{"method.name": "full"}, {"method.name": "lora", "method.r": 16}]
    full = resolve_config(tree=search.trial_tree(base, drawn[0]))
    assert full.method.name == "full"  # the recipe's LoRA settings were dropped
    lora = resolve_config(tree=search.trial_tree(base, drawn[1]))
    assert (lora.method.settings.r, lora.method.settings.alpha) == (16, 32)
    assert base["method"]["r"] == 8  # the base tree is not modified


def test_same_sampler_seed_proposes_the_same_trials(tmp_path):
    space = search.load_space(write(tmp_path / "s.yaml",
                                    "train.lr: {type: float, low: 1e-5, high: 1e-2, log: true}\n"
                                    "method.r: [4, 8, 16]\n"))

    def proposals(seed):
        study = optuna.create_study(sampler=search.make_sampler(seed, 2))
        study.optimize(lambda t: search.draw(t, space, {"method": {"name": "lora"}})["train.lr"],
                       n_trials=5)  # past the 2 random start-up trials: TPE proposes
        return [t.params for t in study.trials]

    assert proposals(3) == proposals(3)
    assert proposals(3) != proposals(4)


def test_study_must_optimise_the_same_metric_the_same_way(tmp_path):
    url = f"sqlite:///{tmp_path / 'db' / 'study.db'}"  # the missing folder is created
    settings = search.SearchSettings(space="unused.yaml")
    study = search.open_study(url, "s", "maximize", "accuracy", settings)
    assert study.user_attrs["metric"] == "accuracy"
    assert search.open_study(url, "s", "maximize", "accuracy", settings)._study_id == \
        study._study_id
    with pytest.raises(TunelabError, match="created to maximize"):
        search.open_study(url, "s", "minimize", "loss", settings)
    with pytest.raises(TunelabError, match="optimises validation accuracy"):
        search.open_study(url, "s", "maximize", "macro_f1", settings)
    with pytest.raises(TunelabError, match="not a database URL"):
        search.connect_storage("study.db")


@pytest.mark.parametrize("field, value, message", [
    ("trials", 0, "--trials"), ("pruner", "hyperband", "--pruner must be one of"),
    ("startup_trials", -1, "--startup-trials")])
def test_search_settings_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=message):
        search.SearchSettings(space="s.yaml", **{field: value})


# -- trackers ---------------------------------------------------------------------------------


def test_tracker_uri_needs_the_mlflow_tracker():
    with pytest.raises(ConfigError, match="set train.tracker=mlflow"):
        resolve_config(overrides=["train.tracker_uri=sqlite:///mlflow.db"])
    config = resolve_config(overrides=["train.tracker=mlflow",
                                       "train.tracker_uri=file:./mlruns"])
    assert config.train.tracker_uri == "file:./mlruns"


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_missing_tracker_package_is_a_clear_error(tracker, monkeypatch):
    from tunelab.train.setup import check_tracker_installed

    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed: import fails
    with pytest.raises(TunelabError, match=f"needs the {tracker} package.*pip install {tracker}"):
        check_tracker_installed(tracker)
    check_tracker_installed(None)  # tracker none: nothing to check
