"""Scale-out through Accelerate's engines with the ready configs in configs/accelerate/.

On CPUs: FSDP (torch FSDP2 over gloo, 2 processes) trains, saves, resumes and matches a
1-process run step for step. Accelerate 1.15 never selects FSDP without a GPU (accelerate/
state.py enables it only for MULTI_GPU-like distributed types), so the launched script flips
that one switch after Accelerate's own setup; everything after it -- fully_shard wrapping,
gathering weights, sharded save_state/load_state, the collectives -- is Accelerate's and
torch's real code. DeepSpeed cannot be run on CPUs through Accelerate at all: what is tested is
that tunelab refuses such a launch clearly and that the DeepSpeed config reaches Accelerate's
plugin with the values tunelab fills in. With a GPU, the same configs run for real (one GPU:
FSDP and ZeRO-2/3 each against a plain run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import toy_rows, write_csv

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"
CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}

FSDP_CPU = """\
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
dynamo_config: {}
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
  fsdp_activation_checkpointing: false
"""

# Runs tunelab's CLI after letting Accelerate select FSDP on CPU (see the module docstring).
# TUNELAB_TEST_STOP_AT=N stops the run after the evaluation and checkpoint of step N, the way a
# hyper-parameter search prunes a trial, so that it can be resumed.
FSDP_ON_CPU = """\
import os, sys
import accelerate.state as st
from accelerate.utils import DistributedType

init = st.AcceleratorState.__init__

def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

st.AcceleratorState.__init__ = fsdp_on_cpu
stop_at = int(os.environ.get("TUNELAB_TEST_STOP_AT", 0))
if stop_at:
    from tunelab.errors import TunelabError
    from tunelab.train import loop

    def stop(step, metrics):
        if step == stop_at:
            raise TunelabError(f"stopped at step {step}")

    train = loop.train
    loop.train = lambda config, resume=None, quiet=False, on_evaluate=None: train(
        config, resume, quiet, stop)
from tunelab.cli import main
code = main(sys.argv[1:])
# the sharded model must be gone before the interpreter shuts down (see loop.end_processes)
import gc
from torch.distributed.fsdp import FSDPModule
left = sum(isinstance(o, FSDPModule) for o in gc.get_objects())
if left and not code:
    print(f"{left} sharded modules outlive the run", file=sys.stderr)
    code = 3
sys.exit(code)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT without dropout (so runs with different process counts can agree exactly),
    24 training rows (6 batches of 4: 3 steps of 2 batches either way) and the launch files."""
    from tunelab.models import build_tiny_model

    d = tmp_path_factory.mktemp("scale")
    model = build_tiny_model(d / "bert", kind="bert", vocab_size=120,
                             texts=[r["text"] for r in toy_rows(200, 0)])
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    (d / "fsdp_cpu.yaml").write_text(FSDP_CPU)
    (d / "fsdp_on_cpu.py").write_text(FSDP_ON_CPU)
    return {"dir": d, "args": [
        f"model.name={model}", f"data.train={write_csv(d / 'train.csv', toy_rows(24, 1))}",
        f"data.validation={write_csv(d / 'validation.csv', toy_rows(16, 2))}",
        f"data.test={write_csv(d / 'test.csv', toy_rows(24, 3))}", "train.lr=5e-3", "train.schedule=constant",
        "train.batch_size=4", "train.epochs=8", "train.log_every=1", "train.precision=fp32",
        "train.threads=1", "train.tracker=none", "model.max_length=32",
        "train.warmup_ratio=0.0", "train.group_by_length=false"]}


def run(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, **(env or {})})
    return out


def launch(config_file, script_args, env=None, processes=None):
    extra = ["--num_processes", str(processes)] if processes else []
    return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(config_file), *extra, *script_args], env)


def one_process(setup, run_dir, *extra, env=None):
    """The reference: one process, 2 batches of 4 accumulated per step, as 2 processes do."""
    out = run([sys.executable, "-m", "tunelab", "train", *setup["args"], "train.grad_accum=2",
               *extra, f"run_dir={run_dir}"], env)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r["loss"] for r in rows if "split" not in r}


def assert_same_run(run_dir, reference, rel=1e-4, learns=True):
    la, lb = losses(reference), losses(run_dir)
    assert sorted(la) == sorted(lb) == list(range(1, 25))  # 3 steps x 8 epochs, none repeated
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=rel, abs=1e-6), step
    if learns:  # full fine-tuning of the tiny model; its LoRA learns too slowly to tell
        assert lb[22] + lb[23] + lb[24] < lb[1] + lb[2] + lb[3] - 0.3
    a = json.loads((reference / "results.json").read_text())
    b = json.loads((run_dir / "results.json").read_text())
    assert b["test"]["n"] == a["test"]["n"] == 24  # evaluation in lockstep still counts each row once
    for split in ("validation", "test"):
        assert b[split]["accuracy"] == a[split]["accuracy"]
        assert b[split]["loss"] == pytest.approx(a[split]["loss"], rel=rel, abs=1e-6)
    assert b["train"]["trainable_params"] == a["train"]["trainable_params"]


def assert_predicts_like(run_dir, reference):
    """The saved run is a normal run directory: it loads and predicts like the reference."""
    import tunelab

    texts = [r["text"] for r in toy_rows(12, 7)]
    got = tunelab.load(run_dir).predict(texts)
    want = tunelab.load(reference).predict(texts)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want):
        assert g["score"] == pytest.approx(w["score"], rel=1e-3)


def test_fsdp_on_two_cpu_processes_matches_one_process(setup, tmp_path):
    fsdp = tmp_path / "fsdp"
    out = launch(setup["dir"] / "fsdp_cpu.yaml", [
        str(setup["dir"] / "fsdp_on_cpu.py"), "train", *setup["args"], f"run_dir={fsdp}"],
        CPU_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    env = json.loads((fsdp / "env.json").read_text())
    assert env["engine"] == "fsdp" and env["processes"] == 2
    # the resumable checkpoint is Accelerate's sharded one: each process wrote its part
    state = fsdp / "state" / (fsdp / "state" / "latest").read_text() / "accelerate"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in state.iterdir()}
    assert (fsdp / "model" / "model.safetensors").exists()
    reference = one_process(setup, tmp_path / "one", env=CPU_ENV)
    assert_same_run(fsdp, reference)
    assert_predicts_like(fsdp, reference)


@pytest.mark.slow
def test_fsdp_lora_stopped_and_resumed_matches_one_process(setup, tmp_path):
    """PEFT under FSDP: only the LoRA weights and the head train; a run stopped after step 12's
    sharded checkpoint and resumed ends exactly where an uninterrupted 1-process run does."""
    lora = tmp_path / "lora"
    args = [str(setup["dir"] / "fsdp_on_cpu.py"), "train", *setup["args"], "method.name=lora",
            "train.eval_every=3", f"run_dir={lora}"]
    stopped = launch(setup["dir"] / "fsdp_cpu.yaml", args,
                     {**CPU_ENV, "TUNELAB_TEST_STOP_AT": "12"})
    assert stopped.returncode != 0 and "stopped at step 12" in stopped.stderr
    assert (lora / "state" / "latest").read_text() == "checkpoint-12"
    assert not (lora / "results.json").exists()
    resumed = launch(setup["dir"] / "fsdp_cpu.yaml", [
        str(setup["dir"] / "fsdp_on_cpu.py"), "train", "--resume", str(lora)], CPU_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {lora} at step 12" in resumed.stderr
    reference = one_process(setup, tmp_path / "one", "method.name=lora", "train.eval_every=3",
                            env=CPU_ENV)
    assert_same_run(lora, reference, learns=False)
    assert (lora / "adapter" / "weights.safetensors").exists()
    assert_predicts_like(lora, reference)


def test_fsdp_config_without_gpu_is_refused(setup, tmp_path):
    """Accelerate would quietly train with plain DDP instead; tunelab says so and stops. (The
    same check covers DeepSpeed configs, whose launch needs the optional package.)"""
    out = launch(CONFIGS / "fsdp.yaml", [
        "-m", "tunelab", "train", *setup["args"], f"run_dir={tmp_path / 'run'}"], CPU_ENV,
        processes=1)
    assert out.returncode != 0
    assert "asks for fsdp" in out.stderr and "only on GPUs" in out.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def deepspeed_plugin(config_file, monkeypatch):
    """The DeepSpeedPlugin Accelerate builds in a process started by `accelerate launch
    --config_file config_file` (from the variables the launcher exports for it)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch does
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    return DeepSpeedPlugin()


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_config_reaches_accelerate_filled_from_the_recipe(name, stage, monkeypatch):
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from tunelab.config import TrainConfig
    from tunelab.errors import ConfigError
    from tunelab.train import engines

    plugin = deepspeed_plugin(CONFIGS / name, monkeypatch)
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2)
    engines.configure_deepspeed(acc, TrainConfig(batch_size=8, max_grad_norm=0.5))
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 16
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    if stage == 3:  # whole weights can be gathered for model/ and adapter/
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    ds["optimizer"] = {"type": "AdamW"}
    with pytest.raises(ConfigError, match="tunelab builds them"):
        engines.configure_deepspeed(acc, TrainConfig())


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not gpu_available(), reason="FSDP and DeepSpeed run through Accelerate only "
                                                  "on GPUs")
@pytest.mark.parametrize("name,method", [
    ("fsdp.yaml", "full"), ("fsdp.yaml", "lora"), ("deepspeed_zero2.yaml", "full"),
    ("deepspeed_zero3.yaml", "full"), ("deepspeed_zero3.yaml", "lora")])
def test_engine_on_one_gpu_matches_plain_run(setup, tmp_path, name, method):
    """One GPU, fp32: the engine's run equals a plain one step for step (2 micro-batches per
    step exercise the accumulation boundary), saves a loadable run and resumes its checkpoint."""
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    args = [*setup["args"], f"method.name={method}", "train.grad_accum=2"]
    run_dir = tmp_path / "engine"
    out = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(CONFIGS / name), "--num_processes", "1", "--mixed_precision", "no",
               "-m", "tunelab", "train", *args, f"run_dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-3000:]
    env = json.loads((run_dir / "env.json").read_text())
    assert env["engine"] == ("fsdp" if name.startswith("fsdp") else "deepspeed")
    reference = one_process(setup, tmp_path / "plain", f"method.name={method}")
    assert_same_run(run_dir, reference, rel=1e-3, learns=method == "full")
    assert_predicts_like(run_dir, reference)
    # resuming the finished run reloads the sharded checkpoint and rewrites the same results
    before = json.loads((run_dir / "results.json").read_text())
    (run_dir / "results.json").unlink()
    again = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(CONFIGS / name), "--num_processes", "1", "--mixed_precision", "no",
                 "-m", "tunelab", "train", "--resume", str(run_dir)])
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads((run_dir / "results.json").read_text())
    assert after["test"]["accuracy"] == before["test"]["accuracy"]
    assert after["test"]["loss"] == pytest.approx(before["test"]["loss"], rel=1e-5)
