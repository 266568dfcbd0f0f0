"""`tunelab fewshot-eval`: the few-shot protocol of the literature, on a recipe's data.

For every k (examples per class) and every seed, k labelled examples per class are drawn from
the recipe's training file (the pool), each method learns from exactly those, and all are
scored on the same test set; the table reports mean ± standard deviation over seeds (Gao et
al. 2021, "Making Pre-trained Language Models Better Few-shot Learners", arXiv 2012.15723;
SetFit reports the same way). One draw is too noisy to compare methods on: at k = 8 the seed
alone moves SST-2 accuracy by several points.

Methods:
  setfit    contrastive fine-tuning + logistic-regression head (tunelab.fewshot)
  finetune  a tunelab training run on the k x C examples (the recipe's method, full by
            default; more epochs and smaller batches than usual: `finetune.epochs`,
            `finetune.batch_size`); its run directory goes under OUT/runs/
  zeroshot  zero-shot with the recipe's model (similarity scorer unless `zeroshot.scorer`;
            `zeroshot.templates=["This review is {}."]`); learns nothing, so it runs once and
            shows as k = 0
  selftrain SetFit on the k x C examples, then self-training on the recipe's
            `selftrain.unlabelled` file (tunelab.selftrain); the row is the last round, every
            round's figures are in results.json
  prompt    prompt-based fine-tuning (PET / LM-BFF, tunelab.prompting): the LM scores each
            label's verbaliser in a pattern, trained with cross-entropy over the label
            scores (`prompt.patterns`, `prompt.verbalizers`, `prompt.method.name=lora`)
"""
from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import ConfigError
from tunelab.io import atomic_write_bytes, atomic_write_json, atomic_write_text

METHODS = ("setfit", "finetune", "zeroshot", "selftrain", "prompt")
ALIASES = {"zeroshot-similarity": "zeroshot"}
SECTIONS = ("setfit", "finetune", "zeroshot", "selftrain", "prompt")
"""Recipe sections (and key=value prefixes) read by fewshot-eval itself, not by `train`."""


@dataclass
class FinetuneSettings:
    epochs: float = 20.0
    """Epochs over the k x C examples: a few optimizer steps per epoch need many epochs."""
    batch_size: int = 8
    """Examples per step (small: 16 examples at batch 32 would be one step per epoch)."""

    def __post_init__(self):
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ConfigError("finetune.epochs and finetune.batch_size must be positive")


@dataclass
class Plan:
    """Everything one fewshot-eval needs, resolved and checked before any training."""

    config: object
    """The recipe's RunConfig (data, model, method, train settings of `finetune`)."""
    setfit: object
    finetune: FinetuneSettings
    methods: list[str]
    ks: list[int]
    seeds: list[int]
    zeroshot: object = None
    """ZeroShotSettings of the zeroshot method."""
    label_spec: object | None = None
    """zeroshot: a LabelSpec (a --label-file); unset: the data's label names."""
    selftrain: object = None
    """SelfTrainSettings of the selftrain method."""
    unlabelled: object = None
    """selftrain: the rows of selftrain.unlabelled (tunelab.selftrain.Unlabelled)."""
    prompt: object = None
    """PromptSettings of the prompt method."""


def parse_methods(text: str) -> list[str]:
    names = [ALIASES.get(m.strip(), m.strip()) for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ConfigError(f"unknown few-shot method {unknown[0] if unknown else text!r}; "
                          f"valid: {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} needs at least one value")
    return values


def make_plan(recipe: str | None, overrides: list[str], methods: list[str], ks: list[int],
              seeds: list[int], label_spec=None) -> Plan:
    """Split the recipe's `setfit:`/`finetune:` sections (and setfit.*/finetune.* overrides)
    from the training config, and validate all of it."""
    from tunelab.config import (build_dataclass, load_recipe, merge_override, parse_override,
                                resolve_config)
    from tunelab.fewshot import setfit_settings
    from tunelab.zeroshot import ZeroShotSettings

    tree = load_recipe(recipe)
    sections = {name: tree.pop(name, None) or {} for name in SECTIONS}
    rest = []
    for text in overrides:
        path, value = parse_override(text)
        if path[0] in SECTIONS:
            merge_override(sections, path, value)
        else:
            rest.append(text)
    config = resolve_config(tree=tree, overrides=rest)
    for name in ("setfit", "zeroshot"):
        sections[name].setdefault("max_length", config.model.max_length)
    if config.task.name != "classification":
        raise ConfigError(f"fewshot-eval evaluates classification; the recipe's task is "
                          f"{config.task.name}")
    if any(k <= 0 for k in ks):
        raise ConfigError(f"--k values must be positive, got {ks}")
    plan = Plan(config, setfit_settings(sections["setfit"]),
                build_dataclass(FinetuneSettings, sections["finetune"], "finetune"),
                methods, ks, seeds,
                build_dataclass(ZeroShotSettings, sections["zeroshot"], "zeroshot"), label_spec)
    if "selftrain" in methods:
        plan.selftrain, plan.unlabelled = selftrain_plan(sections["selftrain"], config)
    from tunelab.prompt_settings import prompt_settings

    plan.prompt = prompt_settings(sections["prompt"])
    return plan


def selftrain_plan(values: dict, config):
    """(settings, unlabelled rows) of the selftrain method, read now so that a missing file
    or column fails before anything trains."""
    from tunelab.selftrain import POOL, check_not_test, load_unlabelled, selftrain_settings

    settings = selftrain_settings(values)
    if settings.unlabelled is None:
        raise ConfigError("the selftrain method needs unlabelled text: set selftrain.unlabelled "
                          "(a recipe section or selftrain.unlabelled=FILE, or =pool for the "
                          "pool's unsampled rows)")
    if settings.unlabelled == POOL:
        return settings, None  # read with the pool, in fewshot_eval
    check_not_test(settings.unlabelled, config.data)
    return settings, load_unlabelled(settings.unlabelled, config.data)


def load_pool_and_test(config):
    """(data, pool, test): the training rows to sample from and the test rows."""
    from tunelab.data.classification import load_classification_data

    cfg = config.data
    if cfg.train is not None and cfg.test is None and cfg.test_ratio == 0:
        raise ConfigError("fewshot-eval scores every method on a test set: set data.test "
                          "(or data.test_ratio to hold one out of data.train)")
    data = load_classification_data(dataclasses.replace(cfg, validation=None,
                                                        validation_ratio=0.0))
    return data, data.splits["train"], data.splits["test"]


def fewshot_eval(plan: Plan, out_dir: str | Path, fresh: bool = False) -> dict:
    """Run every (method, k, seed); write results.{json,md,png} after each; return them.

    Resumable: the runs an earlier fewshot-eval left in OUT/results.json are kept, and a
    (method, k, seed) found there is not run again, so a stopped evaluation continues where it
    stopped and a new k or method extends the table. The earlier runs must share this one's
    data, model and (for the methods run now) settings, else it refuses; `fresh` replaces
    them instead."""
    from tunelab.fewshot import sample_k_per_class

    out_dir = Path(out_dir)
    data, pool, test = load_pool_and_test(plan.config)
    labels = data.labels
    if plan.selftrain is not None and plan.unlabelled is None:
        from tunelab.selftrain import pool_unlabelled

        plan.unlabelled = pool_unlabelled(pool, labels, data.sources["train"])
    if set(plan.methods) - {"zeroshot"}:
        sample_k_per_class(pool, max(plan.ks), 0, labels)  # fail now, not hours later
    pairs = plan.config.data.text_pair_column is not None
    if pairs and set(plan.methods) & {"setfit", "zeroshot", "prompt"}:
        raise ConfigError("setfit, zeroshot and prompt classify single texts; this recipe has "
                          "text pairs (data.text_pair_column): use --methods finetune")
    spec = zeroshot_spec(labels, plan.label_spec) if "zeroshot" in plan.methods else None
    info = {"labels": labels, "pool": len(pool), "test": len(test),
            "pool_source": data.sources["train"], "test_source": data.sources["test"],
            "model": plan.config.model.name, "methods": plan.methods, "ks": plan.ks,
            "seeds": plan.seeds,
            "setfit": {k: v for k, v in plan.setfit.to_dict().items() if k != "seed"},
            "finetune": dataclasses.asdict(plan.finetune),
            "zeroshot": dataclasses.asdict(plan.zeroshot),
            **({"selftrain": {**dataclasses.asdict(plan.selftrain),
                              "unlabelled": plan.unlabelled.source}} if plan.selftrain else {}),
            "prompt": {k: v for k, v in plan.prompt.to_dict().items() if k != "seed"}}
    settings = run_settings(plan, info)
    jobs = [(m, k, s) for m in plan.methods
            for k, s in ([(0, None)] if m == "zeroshot" else
                         [(k, s) for k in plan.ks for s in plan.seeds])]
    earlier = {} if fresh else earlier_runs(out_dir / "results.json", settings)
    rows = [r for r in earlier.get("runs", []) if (r["method"], r["k"], r["seed"]) not in jobs]
    done = {(r["method"], r["k"], r["seed"]): r for r in earlier.get("runs", [])}
    if "selftrain" in earlier.get("settings", {}) and "selftrain" not in settings:
        settings["selftrain"], info["selftrain"] = earlier["settings"]["selftrain"], \
            earlier["selftrain"]  # earlier self-training runs, not run now
    for key in ("methods", "ks", "seeds"):  # what the table covers: earlier runs and these
        info[key] = list(dict.fromkeys([*earlier.get(key, []), *info[key]]))
    for n, (method, k, seed) in enumerate(jobs, 1):
        if (method, k, seed) in done:
            rows.append(done[(method, k, seed)])
            print(f"[{n}/{len(jobs)}] {method} k={k} seed={seed}: kept from the earlier run "
                  f"(accuracy {rows[-1]['accuracy']:.4f})", file=sys.stderr, flush=True)
            continue
        start = time.perf_counter()
        if method == "zeroshot":
            metrics = run_zeroshot(plan, spec, test, labels)
        else:
            sample = sample_k_per_class(pool, k, seed, labels)
            runner = {"setfit": run_setfit, "finetune": run_finetune,
                      "selftrain": run_selftrain, "prompt": run_prompt}[method]
            metrics = runner(plan, labels, sample, test, seed, out_dir, k)
        rows.append({"method": method, "k": k, "seed": seed, "accuracy": metrics["accuracy"],
                     "macro_f1": metrics["macro_f1"],
                     "seconds": round(time.perf_counter() - start, 2),
                     **({"rounds": metrics["rounds"]} if "rounds" in metrics else {})})
        print(f"[{n}/{len(jobs)}] {method} k={k} seed={seed}: accuracy "
              f"{metrics['accuracy']:.4f} macro-F1 {metrics['macro_f1']:.4f} "
              f"({rows[-1]['seconds']} s)", file=sys.stderr, flush=True)
        write_outputs({**info, "settings": settings, "runs": rows, "summary": summarize(rows)},
                      out_dir)
    results = {**info, "settings": settings, "runs": rows, "summary": summarize(rows)}
    if all(job in done for job in jobs):  # nothing ran: the table still gains the new order
        write_outputs(results, out_dir)
    return results


COMMON = ("labels", "pool", "test", "pool_source", "test_source", "model")
"""What every run of a results.json shares: the data and the model."""


NOT_SETTINGS = ("seed", "fast_dropout", "keep_embedding_grads")
"""train.* keys left out of finetune's settings: the seed is each run's own; fast_dropout draws
the same dropout from another random stream, as a torch upgrade may; keep_embedding_grads
gives the same gradients."""


def run_settings(plan: Plan, info: dict) -> dict:
    """What a run's figure depends on besides its k and seed, per method (and "common"; no
    selftrain unless it runs now, as its unlabelled file is read only then): an earlier run is
    reused only where these match, and an earlier run of a method whose settings differ now is
    refused rather than shown beside this invocation's settings."""
    tree = plan.config.to_dict()
    labels = None if plan.label_spec is None else dataclasses.asdict(plan.label_spec)
    settings = {
        "common": {k: info[k] for k in COMMON},
        "setfit": {"setfit": info["setfit"]},
        "finetune": {"finetune": info["finetune"], "method": tree["method"],
                     "train": {k: v for k, v in tree["train"].items()
                               if k not in NOT_SETTINGS},
                     "model": tree["model"]},
        "zeroshot": {"zeroshot": info["zeroshot"], "label_spec": labels},
        "prompt": {"prompt": info["prompt"],
                   "label_spec": None if plan.prompt.verbalizers else labels}}
    if plan.selftrain is not None:
        settings["selftrain"] = {"setfit": info["setfit"], "selftrain": info["selftrain"]}
    return json.loads(json.dumps(settings, default=str))


def earlier_runs(path: Path, settings: dict) -> dict:
    """The results.json an earlier fewshot-eval wrote to this folder ({} when there is none),
    checked against this evaluation's settings."""
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
        runs, before = earlier["runs"], earlier["settings"]
    except (OSError, ValueError, KeyError) as e:
        why = ("it does not record the settings of its runs (an older tunelab wrote it)"
               if isinstance(e, KeyError) else f"it cannot be read: {e}")
        raise ConfigError(f"{path} holds earlier results this fewshot-eval cannot extend: "
                          f"{why}; give another --out, or --fresh to replace them") from None
    for part in ["common", *sorted({r["method"] for r in runs} & set(settings))]:
        changed = _differences(before.get(part), settings[part])
        if changed:
            what = "data and model" if part == "common" else f"{part} settings"
            raise ConfigError(f"{path} holds runs of other {what} ({'; '.join(changed[:3])}): "
                              "give another --out, or --fresh to replace them")
    return earlier


def _differences(before, now, prefix: str = "") -> list[str]:
    """'setfit.num_iterations: 10 before, 20 now' for every leaf that differs."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for key in dict.fromkeys([*before, *now])
                for d in _differences(before.get(key), now.get(key), f"{prefix}{key}.")]
    return [] if before == now else [f"{prefix.rstrip('.') or 'value'}: {before!r} before, "
                                     f"{now!r} now"]


def zeroshot_spec(labels: list[str], spec):
    """The LabelSpec for the data's labels: a label file whose names are the data's labels, or
    (data labelled by ids 0..C-1) whose i-th name is id i; without a file, the names."""
    from tunelab.zeroshot import LabelSpec

    ids = [str(i) for i in range(len(labels))]
    if spec is None:
        if labels == ids:
            raise ConfigError("zeroshot needs label names, but the data labels are ids "
                              f"{labels}: set data.labels (e.g. data.labels=[negative,positive]) "
                              "or give --label-file")
        return LabelSpec(labels, {n: [n] for n in labels}, {n: [n] for n in labels})
    if spec.names == labels or (labels == ids and len(spec.names) == len(labels)):
        return spec
    raise ConfigError(f"the label file names {spec.names}, the data has labels {labels}: give "
                      "the same names in the same order")


def run_zeroshot(plan: Plan, spec, test, labels: list[str]) -> dict:
    from tunelab.zeroshot import ZeroShotClassifier

    clf = ZeroShotClassifier.load(plan.config.model.name, spec, plan.zeroshot)
    return test_metrics(clf.probabilities([e.text for e in test]), test, labels)


def run_setfit(plan: Plan, labels, sample, test, seed: int, out_dir: Path, k: int) -> dict:
    from tunelab.fewshot import SetFitClassifier

    settings = dataclasses.replace(plan.setfit, seed=seed)
    clf = SetFitClassifier(plan.config.model.name, labels, settings)
    clf.fit([e.text for e in sample], [e.label for e in sample])
    return test_metrics(torch.from_numpy(clf.predict_proba([e.text for e in test])), test,
                        labels)


def run_prompt(plan: Plan, labels, sample, test, seed: int, out_dir: Path, k: int) -> dict:
    """PET / LM-BFF with the recipe's model; verbalisers from prompt.verbalizers, else the
    --label-file's, else the label names."""
    from tunelab.prompting import PromptClassifier

    settings = dataclasses.replace(plan.prompt, seed=seed)
    if settings.verbalizers is None and plan.label_spec is not None:
        spec = zeroshot_spec(labels, plan.label_spec)
        settings.verbalizers = {n: spec.verbalizers[s] for n, s in zip(labels, spec.names)}
    clf = PromptClassifier(plan.config.model.name, labels, settings)
    clf.fit([e.text for e in sample], [e.label for e in sample])
    return test_metrics(torch.from_numpy(clf.predict_proba([e.text for e in test])), test,
                        labels)


def run_selftrain(plan: Plan, labels, sample, test, seed: int, out_dir: Path, k: int) -> dict:
    from tunelab.selftrain import fewshot_selftrain

    return fewshot_selftrain(plan, labels, sample, test, seed)


def run_finetune(plan: Plan, labels, sample, test, seed: int, out_dir: Path, k: int) -> dict:
    """A plain `tunelab train` run on the sample: no validation split (there is no data to
    spare), the last step's weights scored on the test rows."""
    from tunelab.config import resolve_config
    from tunelab.train.loop import train

    test_file = out_dir / "data" / "test.jsonl"
    if not test_file.exists():
        write_examples(test_file, test, labels)
    train_file = out_dir / "data" / f"k{k}-seed{seed}.jsonl"
    write_examples(train_file, sample, labels)
    tree = plan.config.to_dict()
    pair = "text_pair" if plan.config.data.text_pair_column else None
    tree["data"].update(train=str(train_file), validation=None, test=str(test_file),
                        format="jsonl", text_column="text", text_pair_column=pair,
                        label_column="label", labels=list(labels), validation_ratio=0.0,
                        test_ratio=0.0, max_train_rows=None)
    tree["train"].update(epochs=plan.finetune.epochs, batch_size=plan.finetune.batch_size,
                         seed=seed, max_steps=None, early_stopping_patience=None)
    tree["run_dir"] = str(out_dir / "runs" / f"finetune-k{k}-seed{seed}")
    run_dir = train(resolve_config(tree=tree), quiet=True)
    return json.loads((Path(run_dir) / "results.json").read_text())["test"]


def write_examples(path: Path, examples, labels: list[str]) -> None:
    from tunelab.data.readers import write_rows

    rows = [{"text": e.text, **({"text_pair": e.text_pair} if e.text_pair is not None else {}),
             "label": labels[e.label]} for e in examples]
    write_rows(path, rows, "jsonl")


def test_metrics(probs: torch.Tensor, test, labels: list[str]) -> dict:
    from tunelab.tasks.classification import ClassificationMetrics

    tracker = ClassificationMetrics(labels)
    gold = torch.tensor([e.label for e in test], dtype=torch.long)
    tracker.update(probs.float().clamp(min=1e-12).log(), {"labels": gold})
    return tracker.compute()


# --------------------------------------------------------------------------------------------
# results


def summarize(rows: list[dict]) -> list[dict]:
    """Per (method, k): mean and sample standard deviation (n - 1) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["k"]), []).append(r)
    out = []
    for (method, k), rs in groups.items():
        entry = {"method": method, "k": k, "seeds": len(rs)}
        for key in ("accuracy", "macro_f1"):
            values = np.array([r[key] for r in rs])
            entry[f"{key}_mean"] = round(float(values.mean()), 4)
            entry[f"{key}_std"] = round(float(values.std(ddof=1)) if len(rs) > 1 else 0.0, 4)
        entry["seconds_mean"] = round(float(np.mean([r["seconds"] for r in rs])), 1)
        out.append(entry)
    return out


def markdown_table(results: dict) -> str:
    lines = [f"Few-shot evaluation of {results['model']}: {results['test']} test rows, "
             f"{len(results['labels'])} labels, pool of {results['pool']} rows; mean ± standard "
             f"deviation over seeds {results['seeds']}.", "",
             "| method | k per class | accuracy | macro-F1 | seeds | seconds per run |",
             "|---|---|---|---|---|---|"]
    for e in results["summary"]:
        lines.append(f"| {e['method']} | {e['k']} | {e['accuracy_mean']:.4f} ± "
                     f"{e['accuracy_std']:.4f} | {e['macro_f1_mean']:.4f} ± "
                     f"{e['macro_f1_std']:.4f} | {e['seeds']} | {e['seconds_mean']} |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out_dir: Path) -> None:
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", markdown_table(results))
    plot(results["summary"], out_dir / "results.png")


def plot(summary: list[dict], path: Path) -> None:
    """Bars per k (one per method) with standard-deviation error bars; zero-shot as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [e for e in summary if e["k"] > 0]
    ks = sorted({e["k"] for e in trained})
    methods = list(dict.fromkeys(e["method"] for e in trained))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(ks) + 2), 4.2))
    width = 0.8 / max(1, len(methods))
    for m, method in enumerate(methods):
        by_k = {e["k"]: e for e in trained if e["method"] == method}
        xs = [i + (m - (len(methods) - 1) / 2) * width for i, k in enumerate(ks) if k in by_k]
        ax.bar(xs, [by_k[k]["accuracy_mean"] for k in ks if k in by_k], width,
               yerr=[by_k[k]["accuracy_std"] for k in ks if k in by_k], capsize=4, label=method)
    for e in summary:
        if e["k"] == 0:
            ax.axhline(e["accuracy_mean"], linestyle="--", color="gray",
                       label=f"{e['method']} (no training)")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("labelled examples per class (k)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
