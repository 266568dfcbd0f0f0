"""The model pool: every served run under a name; adapter runs on one base share its weights.

A run that saved an adapter (every method but `full`) is the base model + the method + a few
trained tensors. Loading each such run with `tunelab.load` would hold one copy of the base
per run. Here the first run on a base loads the base once and keeps its pretrained tensors
(`SharedBase`); every further run on that base is built as a skeleton on the meta device
(no weights read, no memory), whose parameters and buffers are then pointed at the SAME
storage as the base's. Only what the run trained (adapter + head, from adapter/) gets memory
of its own:

    base tensors  --shared-->  run A (lora):   frozen base + A's LoRA matrices + A's head
                  --shared-->  run B (freeze): frozen base + B's head
                  --shared-->  run C (bitfit): frozen base + C's own copies of the biases

A parameter the method trains is given private storage before its weights are loaded, so a
run never writes into the shared tensors. Runs with identical tokenizer files share one
tokenizer too. Classification runs that saved a whole model (`full`) are loaded as they are.
Every classification run is served through a `Predictor`, the engine behind `tunelab predict`.

On CPU a LoRA run alone on its base has its adapter folded into weights of its own, in its
precision (`fused_lora.LoraPlan`: `W + (B A) s`, as `tunelab predict` merges it), so that each
layer is one matmul, as in a merged model. In bf16, with nothing to share, that costs no more memory
than the base's shared layout would, and a MiniLM run answered one short sentence in 6.4-7.0
ms in process where its adapter kept apart took 9.6-9.8. In fp32 (x86) it costs the adapted
layers' weights once more (42 MB for MiniLM; `private_mb` counts it), and a MiniLM run answered
one short sentence in 5.0-5.2 ms in process where kept apart it took 10.5-13.9, 291-311
sentences/s where 227-244. A second run joining the base unfolds it: from then on both
compute over the shared layout (bf16) or the base's weights (fp32).

An onnx or int8 export folder (`tunelab export --to onnx|int8`) is served through ONNX
Runtime (`tunelab.exported.OnnxPredictor`, the engine behind `tunelab predict EXPORT_DIR`):
classification only, /v1/classify only (explaining needs the torch model's gradients).

Runs of the other tasks (token_classification, instruction, causal_lm) load with
`tunelab.load`, each as a model of its own (no base sharing: `shares_base` is None), so they
answer exactly as `tunelab predict` / `tunelab generate` do. `TASK_ENDPOINTS` says which HTTP
endpoints serve each task; a run of a task not listed there is refused when it is added.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

import tunelab
from tunelab import experiments, exported, models, runs
from tunelab.errors import TunelabError
from tunelab.methods import registry
from tunelab.predict import Predictor, keep_weights_cast, keep_weights_fp32, run_uses_bf16
from tunelab.tasks import get_task
from tunelab.tasks.base import BuiltModel
from tunelab.train.fused_lora import fold_lora_layers, unfold_lora_layers


@dataclass
class SharedBase:
    """The pretrained tensors of one base model, by name in the plain (un-adapted) model."""

    path: str
    """The resolved base model (folder or hub id); runs whose model.name resolves to it share."""
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    config: object
    """The Transformers config of the first build: skeletons are built from it."""
    head_modules: list[str]
    family: str

    @classmethod
    def capture(cls, path: str, built: BuiltModel) -> "SharedBase":
        """Keep the base's tensors before the method touches the model. The new head is left
        out: it is per run (its weights come from the run's adapter/)."""
        def in_head(name):
            return any(name == h or name.startswith(h + ".") for h in built.head_modules)

        model = built.model
        params = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)
                  if not in_head(n)}
        buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False) if not in_head(n)}
        return cls(path, params, buffers, copy.deepcopy(model.config), list(built.head_modules),
                   built.family)

    def storages(self) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in [*self.params.values(),
                                                         *self.buffers.values()]}


TASK_ENDPOINTS = {
    "classification": ("/v1/classify", "/v1/explain"),
    "token_classification": ("/v1/tag",),
    "instruction": ("/v1/generate", "/v1/chat/completions"),
    "causal_lm": ("/v1/generate", "/v1/chat/completions"),
}
"""Task -> the endpoints that serve its runs (a causal_lm run chats only with a chat template)."""


@dataclass
class Served:
    name: str
    run_dir: Path
    predictor: object
    """The task's predictor: Predictor, TaggingPredictor, Generator or LMPredictor."""
    task: str
    method: str
    base_model: str
    """config.model.name of the run."""
    shared_base: str | None
    """The resolved base whose tensors this run shares, or None (a model of its own)."""
    trainable_params: int | None
    """None for an export (its parameters are no longer told apart)."""
    private_bytes: int
    """Memory held by this run alone (tensors that are not the shared base's; for an export
    the size of its ONNX file)."""
    chat: object | None = None
    """The Generator that renders message lists with a chat template: the predictor itself
    for instruction runs; for a causal_lm run, one over the same model and tokenizer when the
    tokenizer brings a template of its own; None otherwise."""
    export: str | None = None
    """"onnx" or "int8" when run_dir is an export folder served by ONNX Runtime."""
    folded_bytes: int = 0
    """What the run's folded adapter holds (bf16 weights of its own; 0: not folded)."""

    @property
    def endpoints(self) -> tuple[str, ...]:
        if self.export is not None:
            return ("/v1/classify",)
        found = TASK_ENDPOINTS[self.task]
        if self.chat is None:
            found = tuple(e for e in found if e != "/v1/chat/completions")
        return found

    @property
    def created(self) -> int:
        """When the run (or export) was written: its config.yaml's (export.json's) mtime."""
        return int((self.run_dir / ("export.json" if self.export else "config.yaml"))
                   .stat().st_mtime)

    def describe(self) -> dict:
        p = self.predictor
        return {"name": self.name, "run_dir": str(self.run_dir), "task": self.task,
                "endpoints": list(self.endpoints), "base_model": self.base_model,
                "method": self.method, "labels": list(getattr(p, "labels", [])),
                "trainable_params": self.trainable_params, "shares_base": self.shared_base,
                "private_mb": round((self.private_bytes + self.folded_bytes) / 2**20, 3),
                "adapter_folded": self.folded_bytes > 0,
                "backend": "onnxruntime" if self.export else "torch", "export": self.export,
                "precision": p.precision if self.export else "bf16" if p.bf16 else "fp32"}


class ModelPool:
    """Runs by name. `add` is thread-safe; lookups are plain dict reads."""

    def __init__(self, precision: str = "auto", batch_size: int = 64, threads: int = 0):
        self.precision = precision
        """auto, bf16 or fp32 for runs; an export runs as it was exported."""
        self.batch_size = batch_size
        self.threads = threads
        """ONNX Runtime threads per export session (0: its default, every core); torch's are
        set by the batcher's worker."""
        self.models: dict[str, Served] = {}
        self.bases: dict[str, SharedBase] = {}
        self.tokenizers: dict[str, object] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.models)

    def add(self, name: str, run_dir, settle: bool = True) -> Served:
        """Load `run_dir` as `name`. `settle`: fold or unfold the adapters on its base now
        (see the module's doc); a caller adding several runs at once passes False and calls
        `settle()` after the last, so that no adapter is folded only to be unfolded."""
        run_dir = Path(run_dir)
        with self._lock:
            if name in self.models:
                raise TunelabError(f"a model named {name!r} is already served "
                                   f"(from {self.models[name].run_dir})")
            served = self._load(name, run_dir)
            self.models[name] = served
            if settle:
                self._settle(served.shared_base)
        return served

    def settle(self) -> None:
        with self._lock:
            for path in {s.shared_base for s in self.models.values()} - {None}:
                self._settle(path)

    def _settle(self, path: str | None) -> None:
        """Fold the adapter of a run alone on base `path`; unfold those sharing it."""
        if path is None:
            return
        on_base = [s for s in self.models.values() if s.shared_base == path]
        for served in on_base:
            if len(on_base) == 1:
                dtype = torch.bfloat16 if served.predictor.bf16 else torch.float32
                served.folded_bytes = fold_lora_layers(served.predictor.model, dtype)
            else:  # a forward running meanwhile computes each layer one way or the other
                unfold_lora_layers(served.predictor.model, plan=served.predictor.bf16)
                served.folded_bytes = 0

    def _load(self, name: str, run_dir: Path) -> Served:
        if exported.is_export(run_dir):
            return self._load_export(name, run_dir)
        config, env, labels = runs.read_run(run_dir)
        task = config.task.name
        if task not in TASK_ENDPOINTS:
            raise TunelabError(f"{run_dir} is a {task} run; tunelab serve serves "
                               f"{', '.join(TASK_ENDPOINTS)} runs")
        spec = registry.get_method(config.method.name)
        if task != "classification" or spec.saves == "model":
            return self._load_whole(name, run_dir, config, spec.name)
        model, tokenizer, base = self._build_adapter_model(run_dir, config, labels, env)
        trainable, _ = registry.count_parameters(model)  # before prediction freezes it
        bf16 = run_uses_bf16(env, self.precision)
        # the base's layout is made once and shared by every model over it
        keep_weights_cast(model) if bf16 else keep_weights_fp32(model)
        predictor = Predictor(model, tokenizer, labels, config.model.max_length, bf16,
                              self.batch_size, config)
        predictor.run_dir = run_dir
        return Served(name, run_dir, predictor, task, spec.name, config.model.name, base.path,
                      trainable, owned_bytes(model, base.storages()))

    def _load_export(self, name: str, folder: Path) -> Served:
        meta = exported.read_meta(folder)
        if meta["kind"] not in exported.RUNTIME_KINDS:
            raise TunelabError(f"{folder} is a {meta['kind']} export; tunelab serve serves runs "
                               f"and onnx/int8 exports: serve its run ({meta['run']}) instead")
        predictor = exported.OnnxPredictor(folder, self.threads or None, self.batch_size)
        return Served(name, folder, predictor, "classification", meta["method"],
                      meta.get("base_model"), None, None,
                      (folder / "model.onnx").stat().st_size, export=meta["kind"])

    def _load_whole(self, name: str, run_dir: Path, config, method: str) -> Served:
        """A run as `tunelab.load` gives it, holding every tensor of its own."""
        predictor = tunelab.load(run_dir, precision=self.precision, batch_size=self.batch_size)
        # what the run trained (loaded for bf16 prediction, every weight is frozen)
        results = experiments.read_optional_json(run_dir / "results.json")
        trainable = results.get("train", {}).get("trainable_params")
        if trainable is None:
            trainable, _ = registry.count_parameters(predictor.model)
        task, chat = config.task.name, None
        if task == "instruction":
            chat = predictor
        elif task == "causal_lm":
            chat = chat_generator(predictor)
        return Served(name, run_dir, predictor, task, method, config.model.name, None,
                      trainable, owned_bytes(predictor.model), chat)

    def _build_adapter_model(self, run_dir: Path, config, labels: list[str], env: dict):
        """Base (shared) + method + the run's adapter/ weights; mirrors predict.load_run_model."""
        if runs.existing_dir(run_dir / "adapter") is None:
            raise TunelabError(f"{run_dir} has no adapter/ folder: did the run finish?")
        path = models.resolve_model(config.model.name)
        base = self.bases.get(path)
        if base is None:  # the first run on this base reads its weights, once
            built = get_task(config).build_model(labels)
            base = self.bases[path] = SharedBase.capture(path, built)
            model, tokenizer = built.model, built.tokenizer
        else:
            model, tokenizer = skeleton(base, labels), None
        ctx = registry.context_for(config, base, env.get("total_steps"))
        model = registry.apply_method(model, config.method.name, config.method.settings, ctx)
        load_adapter(model, run_dir / "adapter", base)
        return model.eval(), self._tokenizer(run_dir, path, tokenizer), base

    def _tokenizer(self, run_dir: Path, base_path: str, built=None):
        """The run's tokenizer; runs whose tokenizer files are identical share one object
        (a BERT tokenizer is ~10 MB, ten times what a LoRA adapter of MiniLM holds). Sharing is
        safe: only the batcher's one worker thread tokenizes."""
        folder = runs.existing_dir(run_dir / "tokenizer")
        if folder is None:
            key = f"base:{base_path}"
        else:
            key = "files:" + ",".join(f"{f.name}={runs.file_hash(f)}"
                                      for f in sorted(folder.iterdir()) if f.is_file())
        if key not in self.tokenizers:
            if folder is not None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(folder)
            else:
                tokenizer = built or models.load_tokenizer(base_path)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            self.tokenizers[key] = tokenizer
        return self.tokenizers[key]


def skeleton(base: SharedBase, labels: list[str]) -> torch.nn.Module:
    """The base model class for `labels`, built on the meta device (nothing allocated), with
    every parameter and buffer that the base has pointed at the base's storage. What the base
    lacks (the new head) is zero-filled: the run's adapter/ holds its trained values."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(base.config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {x: i for i, x in enumerate(labels)}
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    done: dict[int, torch.Tensor] = {}  # id(meta tensor) -> real one, so ties stay tied
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for key, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in done:
                    data = _real(base.params.get(prefix + key), p)
                    done[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
                module._parameters[key] = done[id(p)]
        for key, b in list(module._buffers.items()):
            if b is not None:
                if id(b) not in done:
                    done[id(b)] = _real(base.buffers.get(prefix + key), b)
                module._buffers[key] = done[id(b)]
    return model


def _real(shared: torch.Tensor | None, meta: torch.Tensor) -> torch.Tensor:
    if shared is not None and shared.shape == meta.shape and shared.dtype == meta.dtype:
        return shared
    return torch.zeros(meta.shape, dtype=meta.dtype)


def load_adapter(model: torch.nn.Module, folder: Path, base: SharedBase) -> None:
    """Load a run's trained tensors. Every parameter the file holds first gets storage of its
    own, so that loading (an in-place copy) can never write into the shared base."""
    found = runs.existing_dir(folder)
    state = load_file(str(found / runs.WEIGHTS))
    named = dict(model.named_parameters())
    trained = {n for n, p in named.items() if p.requires_grad}
    unexpected = sorted(set(state) - set(named))
    missing = sorted(trained - set(state))
    if unexpected or missing:
        raise TunelabError(f"{found}: weights do not fit the model (unexpected {unexpected[:3]}, "
                           f"missing {missing[:3]}); was the method or base changed?")
    shared = base.storages()
    owners = {id(p): (module, key) for module in model.modules()
              for key, p in module._parameters.items() if p is not None}
    for name in state:
        p = named[name]
        if p.untyped_storage().data_ptr() in shared:
            module, key = owners[id(p)]
            module._parameters[key] = torch.nn.Parameter(p.detach().clone(),
                                                         requires_grad=p.requires_grad)
    model.load_state_dict(state, strict=False)


def owned_bytes(model: torch.nn.Module, shared: set[int] = frozenset()) -> int:
    """Bytes of the model's tensors whose storage is not in `shared`; tied tensors count once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in shared and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def chat_generator(lm):
    """A Generator over a causal_lm run's model and tokenizer, or None. A causal LM is trained
    on plain text; it can chat only if its tokenizer brings a chat template of its own (a
    continued pretraining of an instruct model does, a model trained from scratch does not):
    another template would show it text it never saw."""
    if not lm.tokenizer.chat_template:
        return None
    from tunelab.config import resolve_config
    from tunelab.generate import Generator

    config = resolve_config(tree={"task": {"name": "instruction", "template": "auto"},
                                  "model": {"name": lm.config.model.name,
                                            "max_length": lm.max_length}})
    return Generator(lm.model, lm.tokenizer, config, lm.bf16, lm.batch_size,
                     name=str(lm.run_dir))
