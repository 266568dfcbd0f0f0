"""The `tunelab` argument parser: one sub-parser per verb with its arguments and help, each
bound (`fn`) to its handler in the verb-family modules beside this one."""
from __future__ import annotations

import argparse
import os

from tunelab.cli.deploy import cmd_explain, cmd_export, cmd_monitor, cmd_serve, cmd_verify
from tunelab.cli.fewshot import cmd_fewshot_eval, cmd_self_train, cmd_select, cmd_zeroshot
from tunelab.cli.inference import cmd_chat, cmd_eval, cmd_generate, cmd_predict
from tunelab.cli.info import (cmd_config, cmd_methods, cmd_runs_compare, cmd_runs_diff,
                              cmd_runs_list, cmd_runs_show, cmd_ui)
from tunelab.cli.training import cmd_check, cmd_compare, cmd_pretrain, cmd_search, cmd_train


def add_no_merge(p: argparse.ArgumentParser) -> None:
    """`--no-merge` of the verbs that load a run for prediction (eval, predict)."""
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="keep a LoRA/AdaLoRA/IA3 adapter apart from the base weights (by default "
                        "it is folded in: 1.07x the sentences/s in bf16, one short sentence in "
                        "about half the time; in bf16 a few labels in a thousand can differ)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description=(
        "Adapt pretrained transformers to your task, then evaluate, compare and predict."))
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="train a model from a recipe (default: MiniLM on the demo set)")
    p.add_argument("recipe", nargs="?", help="recipe YAML (optional)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=3e-4")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.set_defaults(fn=cmd_train)

    p = verbs.add_parser("pretrain", help="masked or causal LM on unlabelled text, from scratch "
                                          "(model.size) or continued from model.name")
    p.add_argument("recipe", nargs="?", help="recipe YAML (optional; task defaults to mlm)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.train=corpus.txt")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.set_defaults(fn=cmd_pretrain)

    p = verbs.add_parser("check", help="preflight a recipe's data and show a tokenised example")
    p.add_argument("recipe", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_check)

    p = verbs.add_parser("eval", help="evaluate a run on a labelled file")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="labelled file (same columns as training)")
    p.add_argument("--format", default="auto")
    p.add_argument("--out", help="folder for metrics.json (and plots such as confusion_eval.png)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    add_no_merge(p)
    p.set_defaults(fn=cmd_eval)

    p = verbs.add_parser("predict", help="label every row of a file")
    p.add_argument("run_dir", metavar="RUN_DIR|EXPORT_DIR",
                   help="a run, or its onnx/int8 export (ONNX Runtime; --precision unused)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", default="auto", help="input format")
    p.add_argument("--out-format", help="output format (default: from the output extension)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    add_no_merge(p)
    p.set_defaults(fn=cmd_predict)

    for verb, help_text in (("generate", "generate replies to prompts (instruction run or model)"),
                            ("chat", "chat on the terminal with an instruction run or a model")):
        p = verbs.add_parser(verb, help=help_text)
        p.add_argument("model", metavar="RUN_DIR|MODEL",
                       help="an instruction run, or a causal LM (alias such as smollm2, folder)")
        if verb == "generate":
            p.add_argument("--prompt", action="append", required=True,
                           help="a user message (repeat for several, generated as a batch)")
        p.add_argument("--system", help="system message (default: the run's system prompt)")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling share")
        p.add_argument("--seed", type=int, default=0, help="seed for sampling")
        p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
        p.set_defaults(fn=cmd_generate if verb == "generate" else cmd_chat)

    p = verbs.add_parser("compare", help="train a recipe with several methods and tabulate them")
    p.add_argument("recipe", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--methods", help="comma-separated (default: every method the model supports)")
    p.add_argument("--out", help="output folder (default: runs/compare-<date>-<time>)")
    p.set_defaults(fn=cmd_compare)

    p = verbs.add_parser("search", help="hyper-parameter search over recipe keys (Optuna)")
    p.add_argument("recipe", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--space", required=True, help="YAML: config key -> distribution "
                   "(docs/experiments.md)")
    p.add_argument("--trials", type=int, default=20, help="trials this process runs")
    p.add_argument("--storage", help="Optuna storage shared by every process of the study: "
                   "sqlite:///study.db or an RDB URL (default: sqlite:///OUT/study.db)")
    p.add_argument("--study", help="study name; an existing one is continued "
                   "(default: the recipe's file name)")
    p.add_argument("--pruner", default="median", choices=["median", "asha", "none"])
    p.add_argument("--startup-trials", type=int, default=5,
                   help="trials sampled at random and never pruned before TPE and the median "
                        "rule take over")
    p.add_argument("--seed", type=int, help="sampler seed (default: random)")
    p.add_argument("--out", help="output folder (default: runs/search-<study>)")
    p.set_defaults(fn=cmd_search)

    p = verbs.add_parser("runs", help="list, show, diff and plot run directories")
    runs_verbs = p.add_subparsers(dest="runs_verb", required=True, metavar="ACTION")
    q = runs_verbs.add_parser("list", help="a table of the runs under a folder")
    q.add_argument("dir", nargs="?", default="runs")
    q.set_defaults(fn=cmd_runs_list)
    q = runs_verbs.add_parser("show", help="one run: config, status, results, files")
    q.add_argument("run")
    q.set_defaults(fn=cmd_runs_show)
    q = runs_verbs.add_parser("diff", help="config keys that differ between two runs")
    q.add_argument("run_a")
    q.add_argument("run_b")
    q.set_defaults(fn=cmd_runs_diff)
    q = runs_verbs.add_parser("compare", help="training loss and validation metric curves")
    q.add_argument("runs", nargs="+")
    q.add_argument("--metric", help="validation metric to plot (default: the task's metric)")
    q.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    q.set_defaults(fn=cmd_runs_compare)

    p = verbs.add_parser("export", help="export a run: merged, adapter, onnx, int8")
    p.add_argument("run_dir")
    p.add_argument("--to", required=True, help="merged, adapter, onnx or int8 (comma-separated)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/export/KIND)")
    p.set_defaults(fn=cmd_export)

    p = verbs.add_parser("verify", help="check exports and a live server give the run's "
                         "outputs on probe inputs")
    p.add_argument("run_dir")
    p.add_argument("exports", nargs="*", metavar="EXPORT_DIR")
    p.add_argument("--url", help="a running tunelab serve (http://HOST:PORT): check what its "
                   "/v1/classify answers")
    p.add_argument("--model", help="served name to check (default: RUN_DIR's folder name)")
    p.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"),
                   help="the server's key (default: $TUNELAB_API_KEY)")
    p.add_argument("--data", help="probe file (default: the packaged demo test texts)")
    p.add_argument("-n", type=int, default=256, help="number of probe inputs")
    p.set_defaults(fn=cmd_verify)

    p = verbs.add_parser("serve", help="serve runs over HTTP: classify, tag, generate, "
                         "OpenAI-style chat (adapters on one base share it)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folder, onnx/int8 export folder (served under its run's name), "
                        "or NAME=FOLDER")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' or 'X-API-Key: KEY' "
                        "(default: $TUNELAB_API_KEY; unset = no key)")
    p.add_argument("--max-batch", type=int, default=64, help="texts per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="under load, how long queued requests wait for more to batch with "
                        "(a request that finds the server idle never waits)")
    p.add_argument("--queue-size", type=int, default=256,
                   help="requests that may wait; beyond it: 503")
    p.add_argument("--max-texts", type=int, default=256, help="texts per request")
    p.add_argument("--max-chars", type=int, default=10000, help="characters per text")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=0,
                   help="torch and ONNX Runtime threads for inference (default 0: every "
                        "usable core)")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="most new tokens one generation may ask for (default per request: 256)")
    p.add_argument("--generation-queue", type=int, default=8,
                   help="generation requests held at once, the running one included; "
                        "beyond it: 503")
    p.set_defaults(fn=cmd_serve)

    p = verbs.add_parser("ui", help="local dashboard in the browser: runs table, curves, "
                         "comparisons, start and follow trainings (docs/experiments.md)")
    p.add_argument("--runs", default="runs", help="folder of runs to show, where new "
                   "trainings go (default: runs)")
    p.add_argument("--recipes", help="folder of recipes for the training form "
                   "(default: configs/ when it exists)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(fn=cmd_ui)

    p = verbs.add_parser("monitor", help="classify timestamped texts, track the negative "
                         "share per topic and window, alert on spikes")
    p.add_argument("--run", required=True, help="classification run (sentiment, or any labels)")
    p.add_argument("--topic-run", help="a second run whose label is each text's topic")
    p.add_argument("--input", required=True,
                   help="csv/tsv/json/jsonl/parquet file, or - for a stream of JSON lines or "
                        "CSV (header first) on stdin")
    p.add_argument("--time-column", default="time",
                   help="ISO 8601 times (no zone = UTC) or epoch seconds")
    p.add_argument("--text-column", default="text")
    p.add_argument("--topic-column", help="column holding each text's topic")
    p.add_argument("--window", default="1h", help="window length: 15min, 1h, 1d ... (UTC)")
    p.add_argument("--negative-label", default="negative", help="the label whose share is watched")
    p.add_argument("--threshold", type=float, default=0.4,
                   help="alert when a window's share reaches this")
    p.add_argument("--change", type=float, default=0.2,
                   help="alert when the share moves this much from the previous window")
    p.add_argument("--min-count", type=int, default=20,
                   help="windows with fewer texts raise no alert")
    p.add_argument("--out", help="report folder (default: RUN/monitor/<input name>)")
    p.add_argument("--follow", action="store_true",
                   help="print alerts as they are raised, keep the report current")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip rows with a bad time, text or topic (counted) instead of stopping")
    p.set_defaults(fn=cmd_monitor)

    p = verbs.add_parser("explain", help="which words drove a prediction (token attributions)")
    p.add_argument("run_dir")
    p.add_argument("--text", action="append", required=True, help="a text (repeatable)")
    p.add_argument("--pair", action="append", help="its second text, for pair tasks (repeatable)")
    p.add_argument("--label", help="explain this label (default: the predicted one)")
    p.add_argument("--method", default="ig", choices=["ig", "gxi"],
                   help="ig: integrated gradients (default); gxi: gradient x input (fast)")
    p.add_argument("--steps", type=int, default=50, help="integration steps for ig")
    p.add_argument("--out", help="output folder (default: RUN_DIR/explain)")
    p.set_defaults(fn=cmd_explain)

    p = verbs.add_parser("zeroshot", help="classify with no training: sentence similarity, "
                         "causal-LM scoring or an NLI run (docs/fewshot.md)")
    p.add_argument("--model", required=True, help="minilm, mpnet (similarity); smollm2, "
                   "gemma3-270m (lm); an NLI classification run (nli); or a model folder")
    p.add_argument("--scorer", choices=["similarity", "lm", "nli"],
                   help="default: nli for a run directory, lm for a causal LM, else similarity")
    p.add_argument("--data", required=True, help="texts to classify; with a label column, "
                   "metrics are computed too")
    p.add_argument("--format", default="auto")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--labels", help="comma-separated label names in id order (0, 1, ...)")
    p.add_argument("--label-file", help="YAML/JSON: label -> description(s), or -> "
                   "{descriptions: [...], verbalizers: [...]}")
    p.add_argument("--template", action="append", help="similarity/nli: template with {} for "
                   "the description, e.g. 'This review is {}.' (repeatable)")
    p.add_argument("--aggregate", choices=["max", "mean"],
                   help="combine a label's descriptions/verbalisers (default max)")
    p.add_argument("--temperature", type=float, help="similarity: softmax temperature (0.05)")
    p.add_argument("--prompt", help="lm: prompt with {text}, e.g. 'Review: {text}\\nSentiment:'")
    p.add_argument("--verbalizer-prefix", help="lm: text between prompt and label word "
                   "(default a space; '' for Chinese)")
    p.add_argument("--no-calibration", action="store_true",
                   help="lm: skip contextual calibration")
    p.add_argument("--no-length-norm", action="store_true",
                   help="lm: sum label-token log-probabilities instead of averaging them")
    p.add_argument("--entailment-label", help="nli: the run's entailment label "
                   "(default: the one named entailment)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--output", help="predictions file (default: OUT/predictions.csv)")
    p.add_argument("--out", help="folder for zeroshot.json, metrics.json and the confusion "
                   "plot (default: runs/zeroshot-<date>-<time>)")
    p.set_defaults(fn=cmd_zeroshot)

    p = verbs.add_parser("fewshot-eval", help="k examples per class over several seeds: "
                         "SetFit, fine-tuning, zero-shot; mean ± std table")
    p.add_argument("recipe", nargs="?", help="recipe: data.train is the pool, data.test the test")
    p.add_argument("overrides", nargs="*", help="key=value, including setfit.* and finetune.*")
    p.add_argument("--methods", default="setfit,finetune,zeroshot",
                   help="comma-separated: setfit, finetune, zeroshot, prompt (PET/LM-BFF), "
                        "selftrain (SetFit + self-training on selftrain.unlabelled)")
    p.add_argument("--k", default="8,16,32", help="examples per class (comma-separated)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="sampling/training seeds")
    p.add_argument("--label-file", help="zeroshot: label descriptions (as for tunelab zeroshot)")
    p.add_argument("--out", help="output folder (default: runs/fewshot-<date>-<time>); runs "
                   "an earlier fewshot-eval left there are kept and not run again")
    p.add_argument("--fresh", action="store_true",
                   help="replace the runs an earlier fewshot-eval left in --out")
    p.set_defaults(fn=cmd_fewshot_eval)

    p = verbs.add_parser("self-train", help="train, pseudo-label unlabelled text, retrain: "
                         "one run per round (docs/selftrain.md)")
    p.add_argument("recipe", nargs="?", help="recipe with the labelled data (data.train)")
    p.add_argument("overrides", nargs="*", help="key=value, including selftrain.*")
    p.add_argument("--unlabelled", help="texts to pseudo-label (the recipe's text column; a "
                   "label column there is only used to report pseudo-label accuracy)")
    p.add_argument("--rounds", type=int, help="self-training rounds after the first run (3)")
    p.add_argument("--threshold", type=float,
                   help="least confidence for a pseudo-label (0.7)")
    p.add_argument("--per-class", type=int, help="most rows added per class per round (32)")
    p.add_argument("--sample-unlabelled", type=int,
                   help="unlabelled rows scored per round, a seeded sample (5000)")
    p.add_argument("--seed", type=int, help="seed of those samples (0)")
    p.add_argument("--out", required=True, help="folder for the rounds' runs and rounds.json")
    p.set_defaults(fn=cmd_self_train)

    p = verbs.add_parser("select", help="active learning: the unlabelled rows most worth "
                         "labelling next, with the model's guess")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="unlabelled rows (the run's text column)")
    p.add_argument("--n", type=int, required=True, help="rows to select")
    p.add_argument("--strategy", default="hybrid", choices=["uncertainty", "margin", "entropy",
                                                            "diversity", "hybrid"],
                   help="uncertainty (least confidence), margin, entropy, diversity (k-means "
                        "on embeddings) or hybrid (diversity among the 10 x N least "
                        "confident; default)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (diversity, hybrid)")
    p.add_argument("--out", required=True, help="CSV or JSONL to write (by its suffix)")
    p.set_defaults(fn=cmd_select)

    p = verbs.add_parser("methods", help="list adaptation methods and what they support")
    p.set_defaults(fn=cmd_methods)
    p = verbs.add_parser("config", help="list every config key with its default and doc")
    p.set_defaults(fn=cmd_config)
    return parser
