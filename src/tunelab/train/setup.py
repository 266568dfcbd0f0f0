"""Everything a run builds before its first step: devices and threads, the run directory,
the data (with its preflight), the model with its method applied, and the step plan."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab import runs
from tunelab.config import RunConfig, resolve_config, save_config
from tunelab.errors import TunelabError
from tunelab.io import atomic_write_json
from tunelab.methods import registry
from tunelab.tasks import get_task
from tunelab.tasks.base import Task
from tunelab.train import engines
from tunelab.train.dropout import use_fast_dropout
from tunelab.train.embedding_grads import EmbeddingGrads
from tunelab.train.frozen import cache_frozen_casts
from tunelab.train.fused_lora import fuse_lora_layers
from tunelab.train.grouped import group_projections
from tunelab.train.memory import keep_freed_memory


@dataclass
class Prepared:
    config: RunConfig
    task: Task
    accelerator: object
    run_dir: Path
    labels: list[str]
    model: torch.nn.Module
    tokenizer: object
    encoded: dict  # split -> the task's Encoded
    pad_id: int
    bf16: bool
    lr: float
    steps_per_epoch: int
    total_steps: int
    quiet: bool = False
    parameters: tuple[int, int] = (0, 0)
    """(trainable, total) parameter counts, taken before an engine shards the model."""
    saved: set[str] | None = None
    """Names of the parameters a checkpoint keeps (None: the whole state dict), read before an
    engine wraps the model and renames or flattens them."""
    embedding_grads: EmbeddingGrads | None = None
    """Kept dense gradients of the large embeddings (one CPU process, plain engine)."""

    @property
    def train(self):
        return self.encoded["train"]

    def say(self, text: str) -> None:
        if self.accelerator.is_main_process and not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        runs.append_jsonl(self.run_dir / "metrics.jsonl", record)
        numbers = {f"{record.get('split', 'train')}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        self.accelerator.log(numbers, step=record["step"])

    def progress(self, initial: int):
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=initial, unit="step", desc="train",
                    disable=not self.accelerator.is_main_process or self.quiet,
                    dynamic_ncols=True, mininterval=1.0)


def prepare(config: RunConfig, resume, quiet: bool = False) -> Prepared:
    from tunelab.train.evaluate import resolve_precision
    from tunelab.train.loop import check_metric, default_threads, plan_steps

    if resume:
        config = resumed_config(Path(resume), config)
    task = get_task(config)
    check_metric(task)
    accelerator = make_accelerator(config)
    threads = config.train.threads or max(1, default_threads() // accelerator.num_processes)
    torch.set_num_threads(threads)
    freed_memory_kept = config.train.keep_freed_memory and keep_freed_memory()
    run_dir = shared_run_dir(accelerator, Path(resume) if resume else runs.new_run_dir(config))
    precision = resolve_precision(config.train.precision, accelerator.device.type)
    data = load_data(task, accelerator, quiet)
    built = task.build_model(data.labels)
    attention = config.train.attention
    if attention == "auto":
        attention = "eager" if accelerator.device.type == "cpu" else "sdpa"
    if hasattr(built.model, "set_attn_implementation"):
        built.model.set_attn_implementation(attention)
    encoded = {split: task.encode(built.tokenizer, rows) for split, rows in data.splits.items()}
    spec = registry.get_method(config.method.name)
    per_epoch, total = plan_steps(batches_per_process(len(encoded["train"]), config.train.batch_size,
                                                      accelerator.num_processes), config.train)
    ctx = registry.context_for(config, built, total)
    model = registry.apply_method(built.model, config.method.name, config.method.settings, ctx)
    if precision == "bf16":
        skip_adapter_input_casts(model)
    engine = engines.kind(accelerator)
    # ZeRO-3 gathers a weight when its own module runs; the fused layer reads lora_B's directly
    fused_lora = fuse_lora_layers(model) if engine != "deepspeed" else 0
    fast_dropout = config.train.fast_dropout and accelerator.device.type == "cpu"
    if fast_dropout:  # GPUs draw torch's masks in a fused kernel already
        use_fast_dropout(model)
    plain = engine == "plain"
    grouped = 0
    if plain:  # a sharding engine would keep whole copies
        cache_frozen_casts(model)
        if precision == "bf16" and accelerator.device.type == "cpu":  # where groups compute
            grouped = group_projections(model)
    keep = (config.train.keep_embedding_grads and plain and accelerator.num_processes == 1
            and accelerator.device.type == "cpu")
    embedding_grads = EmbeddingGrads(model) if keep else None
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lr = config.train.lr or spec.default_lr
    p = Prepared(config, task, accelerator, run_dir, data.labels, model, built.tokenizer, encoded,
                 built.tokenizer.pad_token_id, precision == "bf16", lr, per_epoch, total, quiet,
                 embedding_grads=embedding_grads)
    if accelerator.is_main_process:
        write_run_files(p, data, threads, precision, fast_dropout,
                        {"fused_lora_layers": fused_lora, "grouped_projections": grouped},
                        freed_memory_kept, resume is not None)
    start_tracker(p)
    trainable, all_params = p.parameters = registry.count_parameters(model)
    origin = (f"new {config.model.size} model" if config.model.size
              else f"model {config.model.name}")
    p.say(f"task {task.name}, {origin} ({built.family}), method {config.method.name}: "
          f"{trainable:,} of {all_params:,} parameters train ({100 * trainable / all_params:.2f}%)"
          f"; lr {lr:g}, {total} steps, precision {precision}, {threads} threads"
          f", {accelerator.num_processes} process(es)")
    return p


def batches_per_process(rows: int, batch_size: int, world: int) -> int:
    """What `batching.shard` hands each process per epoch."""
    batches = -(-rows // batch_size)
    return batches // world if batches >= world else batches


def resumed_config(run_dir: Path, overrides_config: RunConfig | None) -> RunConfig:
    """The config a run was started with (config.yaml); the run_dir is the one given."""
    if not (run_dir / "config.yaml").is_file():
        raise TunelabError(f"cannot resume {run_dir}: it has no config.yaml (not a tunelab run)")
    if runs.latest_checkpoint(run_dir) is None:
        raise TunelabError(f"cannot resume {run_dir}: no checkpoint was written yet "
                           f"(state/latest is missing); start the run again instead")
    config = resolve_config(run_dir / "config.yaml")
    config.run_dir = str(run_dir)
    return config


def make_accelerator(config: RunConfig):
    from accelerate import Accelerator

    tracker = None if config.train.tracker == "none" else config.train.tracker
    check_tracker_installed(tracker)
    # the real folder is set once all processes agree on the run directory (start_tracker)
    # cpu=True on a machine without CUDA: only then does Accelerate set up gloo DDP when
    # launched with several processes (torchrun, accelerate launch --multi_gpu)
    accelerator = Accelerator(log_with=tracker, project_dir=".", cpu=not torch.cuda.is_available())
    engines.check_requested(accelerator)
    return accelerator


def check_tracker_installed(tracker: str | None) -> None:
    """Accelerate drops a tracker whose package is missing with only a warning, and the run
    would then log nowhere: refuse before anything is written instead."""
    import importlib

    if tracker is None or tracker == "tensorboard":
        return
    try:
        importlib.import_module(tracker)
    except ImportError:
        raise TunelabError(f"train.tracker={tracker} needs the {tracker} package, which is not "
                           f"installed: pip install {tracker}, or set train.tracker=none") from None


def shared_run_dir(accelerator, run_dir: Path) -> Path:
    """All processes must write to the folder the main process chose."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        holder = [str(run_dir)]
        broadcast_object_list(holder, from_process=0)
        run_dir = Path(holder[0])
    return run_dir


def load_data(task: Task, accelerator, quiet: bool):
    data = task.load_data()
    if "train" not in data.splits:
        raise TunelabError("no training data: set data.train")
    if accelerator.is_main_process and not quiet:
        print(task.format_preflight(data), file=sys.stderr, flush=True)
    return data


def skip_adapter_input_casts(model) -> int:
    """PEFT layers (LoRA, AdaLoRA, IA3) cast their input to their fp32 weights' dtype, and under
    bf16 autocast the adapter's matmul casts it straight back: two activation-sized copies per
    layer forward and two backward, for bit-identical results (bf16 -> fp32 -> bf16 is exact).
    Training runs every forward under autocast, so it skips them: ~5% of a MiniLM LoRA step.
    Returns the number of layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def write_run_files(p: Prepared, data, threads: int, precision: str, fast_dropout: bool,
                    fused: dict, freed_memory_kept: bool, resumed: bool) -> None:
    p.run_dir.mkdir(parents=True, exist_ok=True)
    if not resumed:
        if (p.run_dir / "results.json").exists() or (p.run_dir / "state").exists():
            raise TunelabError(f"{p.run_dir} already holds a run; pick another run_dir, or "
                               f"continue it with --resume {p.run_dir}")
        save_config(p.config, p.run_dir / "config.yaml")
    preflight = data.preflight()
    preflight["truncated"] = {s: e.truncated for s, e in p.encoded.items()}
    atomic_write_json(p.run_dir / "preflight.json", preflight)
    atomic_write_json(p.run_dir / "label_map.json", dict(enumerate(p.labels)))
    atomic_write_json(p.run_dir / "env.json", runs.environment(p.config, {
        "precision": precision, "threads": threads, "processes": p.accelerator.num_processes,
        "dropout": "fast (16-bit masks)" if fast_dropout else "torch",
        "kept_embedding_grads": len(p.embedding_grads) if p.embedding_grads else 0,
        **fused,
        "freed_memory": "kept for reuse" if freed_memory_kept else "malloc's default",
        "device": str(p.accelerator.device), "lr": p.lr, "total_steps": p.total_steps,
        "engine": engines.kind(p.accelerator), "zero_stage": engines.zero_stage(p.accelerator),
        "world_size_env": os.environ.get("WORLD_SIZE")}))


def start_tracker(p: Prepared) -> None:
    if p.config.train.tracker == "none":
        return
    project = p.accelerator.project_configuration
    project.project_dir = project.logging_dir = str(p.run_dir)
    flat = {}
    for section, values in p.config.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        else:
            flat[section] = str(values)
    uri = p.config.train.tracker_uri
    if uri:
        import mlflow

        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store only behind an opt-in; asking for one is that
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
    # one tracker run per run directory, named after it; W&B writes its files inside the run
    names = {"mlflow": {"run_name": p.run_dir.name},
             "wandb": {"name": p.run_dir.name, "dir": str(p.run_dir)}}
    p.accelerator.init_trackers("tb" if p.config.train.tracker == "tensorboard" else "tunelab",
                                config=flat, init_kwargs=names)
