"""Exact resume after kill -9, and the same run under `accelerate launch` with 2 processes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest


def run_cli(args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, **kw)


def losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r["loss"] for r in rows if "split" not in r}


def test_resume_after_kill_matches_uninterrupted_run(tiny_overrides, tmp_path):
    base = [o for o in tiny_overrides if not o.startswith("run_dir=")]
    base += ["train.epochs=60", "train.save_every=10", "train.eval_every=50"]
    straight = tmp_path / "straight"
    done = run_cli(["train", *base, f"run_dir={straight}"])
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", *base,
                             f"run_dir={killed}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = killed / "state" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    at = int(latest.read_text().split("-")[1])
    assert 0 < at < 300

    resumed = run_cli(["train", "--resume", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {killed} at step {at}" in resumed.stderr
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    for split in ("validation", "test"):
        assert b[split]["accuracy"] == a[split]["accuracy"]
        assert b[split]["loss"] == pytest.approx(a[split]["loss"], rel=1e-6, abs=1e-7)
    assert b["train"]["steps"] == a["train"]["steps"] == 300
    la, lb = losses(straight), losses(killed)
    assert sorted(la) == sorted(lb)  # no step logged twice or skipped
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-7), step


def test_resume_errors_are_clear(tmp_path):
    out = run_cli(["train", "--resume", str(tmp_path)])
    assert out.returncode == 2 and "no config.yaml" in out.stderr and "Traceback" not in out.stderr


def test_two_processes_with_accelerate_launch(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith(("train.threads", "train.epochs"))]
    overrides += ["train.epochs=4"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "tunelab", "train", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    env = json.loads((run / "env.json").read_text())
    assert env["processes"] == 2
    results = json.loads((run / "results.json").read_text())
    assert results["train"]["processes"] == 2
    # 20 rows in 5 batches of 4; two processes share 4 of them: 2 steps per epoch, 4 epochs
    assert results["train"]["steps"] == 8
    assert results["test"]["n"] == 24  # evaluation covers every row across the two processes
    assert (run / "model" / "model.safetensors").exists()
    assert (run / "model" / "config.json").exists()
