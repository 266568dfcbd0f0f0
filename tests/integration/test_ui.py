"""`tunelab ui`'s JSON API on a real server (loopback port): runs table, one run, curves,
diffs and plots of tiny runs trained here; the training form; a training started over HTTP
and followed until it finishes."""
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serving import running
from tunelab import experiments
from tunelab.cli import main
from tunelab.config import resolve_config
from tunelab.train.loop import train
from tunelab.ui.app import UiSettings, create_app


@pytest.fixture(scope="module")
def recipes(tiny_bert, toy_data, tmp_path_factory):
    """A tiny recipe (about 10 s as a child process, most of it imports), a file that is not a
    recipe, and a recipe whose training file is missing."""
    folder = tmp_path_factory.mktemp("recipes")
    tree = {"model": {"name": tiny_bert, "max_length": 32},
            "data": {"train": toy_data["train"], "validation": toy_data["validation"],
                     "test": toy_data["test"]},
            "method": {"name": "full"},
            "train": {"lr": 2e-3, "batch_size": 4, "epochs": 2, "eval_every": 5, "log_every": 1,
                      "precision": "fp32", "threads": 1, "tracker": "none",
                      "warmup_ratio": 0.0}}
    (folder / "tiny.yaml").write_text("# tiny BERT on the toy set\n" + yaml.safe_dump(tree))
    (folder / "labels.yaml").write_text("negative: a bad review\npositive: a good review\n")
    tree["data"]["train"] = str(folder / "missing.csv")
    (folder / "missing_data.yaml").write_text(yaml.safe_dump(tree))
    return folder


@pytest.fixture(scope="module")
def runs_root(recipes, tmp_path_factory):
    """Two finished runs that differ in method and learning rate, one inside a sub-folder."""
    root = tmp_path_factory.mktemp("runs")
    for run_dir, extra in ((root / "full", ["train.lr=2e-3"]),
                           (root / "sweep" / "lora", ["method.name=lora", "train.lr=5e-3"])):
        config = resolve_config(recipes / "tiny.yaml", ["train.epochs=1", *extra,
                                                        f"run_dir={run_dir}"])
        train(config, quiet=True)
    return root


@pytest.fixture(scope="module")
def server(runs_root, recipes):
    app = create_app(UiSettings(runs=str(runs_root), recipes=str(recipes)))
    with running(app) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


def test_runs_table_lists_every_run_with_its_result(server, runs_root):
    rows = {r["id"]: r for r in server.get("/api/runs").json()["runs"]}
    assert {"full", "sweep/lora"} <= set(rows)
    for rid in ("full", "sweep/lora"):
        row = rows[rid]
        results = experiments.read_optional_json(runs_root / rid / "results.json")
        assert row["status"] == "finished"
        assert row["metric"] == "accuracy"
        assert row["validation"] == results["validation"]["accuracy"]
        assert row["steps"] == row["total_steps"] == results["train"]["steps"]
    assert rows["sweep/lora"]["method"] == "lora"


def test_run_detail_has_config_results_files_plots_and_progress(server, runs_root):
    run = server.get("/api/run", params={"run": "sweep/lora"}).json()
    assert run["config"]["method"]["name"] == "lora"
    assert run["results"]["test"]["accuracy"] == experiments.read_optional_json(
        runs_root / "sweep/lora/results.json")["test"]["accuracy"]
    names = {f["name"] for f in run["files"]}
    assert {"config.yaml", "metrics.jsonl", "results.json", "adapter"} <= names
    assert "confusion_validation.png" in run["plots"]
    assert run["progress"]["step"] == run["progress"]["total_steps"] > 0
    assert run["progress"]["eta_s"] is None  # finished
    missing = server.get("/api/run", params={"run": "nope"})
    assert missing.status_code == 404 and "no run 'nope'" in missing.json()["error"]["message"]


def test_curves_are_those_runs_compare_reads(server, runs_root):
    data = server.get("/api/curves", params={"run": ["full", "sweep/lora"]}).json()
    assert data["metric"] == "accuracy" and not data["lower_is_better"]
    assert {"accuracy", "loss"} <= set(data["metrics"])
    for curve in data["runs"]:
        loss, val = experiments.curves(runs_root / curve["run"], "accuracy")
        assert curve["loss"] == [list(p) for p in loss] and len(loss) > 1
        assert curve["validation"] == [list(p) for p in val]
        assert curve["best"] == max(v for _, v in val)
    by_loss = server.get("/api/curves", params={"run": "full", "metric": "loss"}).json()
    assert by_loss["lower_is_better"] and by_loss["runs"][0]["validation"]


def test_diff_lists_the_keys_that_differ(server, runs_root):
    data = server.get("/api/diff", params={"run": ["full", "sweep/lora"]}).json()
    config = {row["key"]: row["values"] for row in data["config"]}
    assert config["method.name"] == ["full", "lora"]
    assert config["train.lr"] == [0.002, 0.005]
    assert config["method.r"] == ["<unset>", 8]  # only LoRA has it
    expected = experiments.config_diff(runs_root / "full", runs_root / "sweep/lora")
    assert [(r["key"], *r["values"]) for r in data["config"]] == expected
    assert "run_dir" not in config
    assert [s["method"] for s in data["summaries"]] == ["full", "lora"]
    one = server.get("/api/diff", params={"run": "full"})
    assert one.status_code == 400 and "two runs or more" in one.json()["error"]["message"]


def test_plot_is_served_and_paths_leaving_the_run_are_refused(server, runs_root, tmp_path):
    png = server.get("/api/plot", params={"run": "full", "path": "confusion_test.png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == (runs_root / "full" / "confusion_test.png").read_bytes()
    secret = runs_root / "secret.png"
    secret.write_bytes(b"\x89PNG not for the page")
    (runs_root / "full" / "link.png").symlink_to(secret)
    for params in ({"run": "full", "path": "../secret.png"},
                   {"run": "full", "path": str(secret)},
                   {"run": "full", "path": "link.png"},
                   {"run": "full", "path": "config.yaml"},
                   {"run": "sweep/lora", "path": "../../full/confusion_test.png"}):
        refused = server.get("/api/plot", params=params)
        assert refused.status_code == 400, params
        assert "not a PNG inside run" in refused.json()["error"]["message"]
    outside = server.get("/api/plot", params={"run": "../" + runs_root.name + "/full/..",
                                              "path": "x.png"})
    assert outside.status_code in (400, 404)
    escaped = server.get("/api/run", params={"run": "../.."})
    assert escaped.status_code == 400 and "outside the runs folder" in escaped.text
    raw = server.get("/api/plot?run=full&path=..%2F..%2F..%2Fetc%2Fpasswd")
    assert raw.status_code == 400


def test_recipes_and_their_fields(server):
    listed = {r["path"]: r for r in server.get("/api/recipes").json()["recipes"]}
    assert listed["tiny.yaml"]["error"] is None
    assert listed["tiny.yaml"]["title"] == "tiny BERT on the toy set"
    assert "unknown key negative" in listed["labels.yaml"]["error"]
    assert listed[""]["error"] is None  # the packaged default
    fields = {f["key"]: f for f in server.get("/api/recipe", params={"path": "tiny.yaml"})
              .json()["fields"]}
    lr = fields["train.lr"]
    assert (lr["value"], lr["text"], lr["type"], lr["nullable"]) == (0.002, "0.002", "float", True)
    assert lr["doc"].startswith("Peak learning rate.")  # the docstring under the field
    assert "lora" in fields["method.name"]["choices"]
    assert "run_dir" not in fields and "method.r" not in fields  # full has no rank


def test_form_turns_edits_into_overrides(server):
    form = server.post("/api/form", json={"recipe": "tiny.yaml", "values": {
        "method.name": "lora", "train.lr": "0.002", "train.epochs": "3"}}).json()
    assert form["overrides"] == ["method={name: lora}", "train.epochs=3"]  # lr is unchanged
    assert {f["key"]: f["text"] for f in form["fields"]}["method.r"] == "8"
    assert form["command"].startswith("tunelab train ")
    assert form["command"].endswith("tiny.yaml 'method={name: lora}' train.epochs=3")


@pytest.mark.parametrize("body,field,message", [
    ({"values": {"train.lr": "-1"}}, "train.lr", "train.lr must be positive"),
    ({"values": {"train.batch_size": "many"}}, "train.batch_size",
     "train.batch_size must be int, got 'many'"),
    ({"values": {"train.lrr": "1"}}, "train.lrr", "unknown field train.lrr"),
    ({"values": {"method.name": "lorax"}}, "method.name", "method.name must be one of adalora"),
    ({"values": {"run_dir": "/tmp/x"}}, "run_dir", "run_dir is chosen by the dashboard"),
    ({"recipe": "missing_data.yaml"}, "data.train", "missing.csv does not exist"),
    ({"recipe": "../recipes/tiny.yaml"}, None, "is not a YAML file inside"),
])
def test_bad_training_request_is_400_with_the_message(server, runs_root, body, field, message):
    before = sorted(runs_root.iterdir())
    answer = server.post("/api/train", json={"recipe": "tiny.yaml", **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert message in error["message"]
    assert error.get("field") == field
    assert sorted(runs_root.iterdir()) == before  # nothing was started


def test_host_header_of_another_site_is_refused(server):
    assert server.get("/api/runs", headers={"Host": "attacker.example"}).status_code == 400
    assert server.get("/", headers={"Host": "localhost:7860"}).status_code == 200


def test_training_started_over_http_runs_to_finished(server, runs_root):
    answer = server.post("/api/train", json={"recipe": "tiny.yaml", "name": "from-ui",
                                             "values": {"train.epochs": "3"}})
    assert answer.status_code == 202, answer.text
    job = answer.json()["job"]
    assert job["run"] == "from-ui" and job["running"]
    assert job["command"].endswith("tiny.yaml train.epochs=3 run_dir=" + str(
        runs_root / "from-ui"))
    busy = server.post("/api/train", json={"recipe": "tiny.yaml", "name": "second"})
    assert busy.status_code == 409 and "already running" in busy.json()["error"]["message"]
    seen_steps = set()
    deadline = time.monotonic() + 120
    while job["running"]:
        assert time.monotonic() < deadline, job["log"]
        time.sleep(0.5)
        job = server.get("/api/train").json()["job"]
        if job["progress"]:
            seen_steps.add(job["progress"]["step"])
    assert job["state"] == "finished" and job["returncode"] == 0, job["log"]
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 15  # 20 rows / 4 x 3
    assert "run written to" in job["log"] and job["error"] is None
    assert (runs_root / "from-ui" / "train.log").is_file()
    rows = {r["id"]: r for r in server.get("/api/runs").json()["runs"]}
    assert rows["from-ui"]["status"] == "finished" and rows["from-ui"]["test"] is not None
    assert resolve_config(runs_root / "from-ui" / "config.yaml").train.epochs == 3.0
    taken = server.post("/api/train", json={"recipe": "tiny.yaml", "name": "from-ui"})
    assert taken.status_code == 409 and "already exists" in taken.json()["error"]["message"]


def test_stop_interrupts_the_training_resumably(server, runs_root):
    # a server started in a script's background inherits SIGINT ignored; its children must
    # still hear the stop
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        answer = server.post("/api/train", json={"recipe": "tiny.yaml", "name": "stopped",
                                                 "values": {"train.epochs": "20000"}})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 120
    job = answer.json()["job"]
    while not (job["progress"] and job["progress"]["step"] >= 6):  # a checkpoint at step 5
        assert job["running"] and time.monotonic() < deadline, job["log"]
        time.sleep(0.3)
        job = server.get("/api/train").json()["job"]
    assert job["progress"]["eta_s"] > 0
    server.post("/api/train/stop")
    while job["running"]:
        assert time.monotonic() < deadline, job["log"]
        time.sleep(0.3)
        job = server.get("/api/train").json()["job"]
    assert job["state"] == "interrupted" and job["returncode"] == 130
    assert (Path(runs_root) / "stopped" / "state" / "latest").is_file()
    again = server.post("/api/train/stop")
    assert again.status_code == 400 and "no dashboard training" in again.text


def test_command_line_settings_are_checked(tmp_path, capsys, monkeypatch):
    assert main(["ui", "--recipes", str(tmp_path / "nope")]) == 2
    assert f"--recipes {tmp_path / 'nope'} is not a folder" in capsys.readouterr().err
    assert main(["ui", "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    (tmp_path / "configs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert UiSettings().recipes_dir() == tmp_path / "configs"  # the default, when it exists
    (tmp_path / "configs").rmdir()
    assert UiSettings().recipes_dir() is None
