"""The `tunelab` command: a table of verbs.

    tunelab train [RECIPE.yaml] [key.sub=value ...] [--resume RUN_DIR]
    tunelab pretrain [RECIPE.yaml] [key.sub=value ...] [--resume RUN_DIR]   masked/causal LM
    tunelab check [RECIPE.yaml] [key.sub=value ...]     preflight only: data counts, problems
    tunelab eval RUN_DIR --data FILE
    tunelab predict RUN_DIR|EXPORT_DIR --input FILE --output FILE
    tunelab generate RUN_DIR|MODEL --prompt TEXT [--prompt ...] [--system TEXT]
    tunelab chat RUN_DIR|MODEL                            a conversation on the terminal
    tunelab compare [RECIPE.yaml] [key=value ...] --methods full,lora,...
    tunelab search RECIPE.yaml [key=value ...] --space SPACE.yaml --trials N   (Optuna)
    tunelab runs list [DIR] | show RUN | diff RUN_A RUN_B | compare RUN ... --out PNG
    tunelab export RUN_DIR --to merged|adapter|onnx|int8
    tunelab verify RUN_DIR [EXPORT_DIR ...] [--url http://HOST:PORT [--model NAME]]
    tunelab serve RUN_DIR|EXPORT_DIR|NAME=DIR ... [--port 8000] [--api-key KEY]   HTTP API
    tunelab ui [--runs DIR] [--recipes DIR] [--port 7860]   local dashboard: runs, curves, train
    tunelab monitor --run RUN --input FILE|- [--topic-column C] [--window 1h] [--follow]
    tunelab explain RUN_DIR --text TEXT [--text ...] [--method ig|gxi]   token attributions
    tunelab zeroshot --model MODEL|RUN_DIR --data FILE (--labels a,b | --label-file F)
    tunelab fewshot-eval RECIPE.yaml [key=value ...] --methods setfit,prompt,selftrain,... --k 8,16
    tunelab self-train RECIPE.yaml [key=value ...] --unlabelled FILE --rounds N --out DIR
    tunelab select RUN_DIR --data FILE --n N [--strategy hybrid] --out FILE   rows to label next
    tunelab methods                                      the method support matrix
    tunelab config                                       every config key with its doc
"""
from __future__ import annotations

import sys

from tunelab.cli.parser import build_parser
from tunelab.errors import TunelabError


def quiet_libraries() -> None:
    """tunelab reports what matters itself (new head, parameters that train); the libraries'
    load reports and per-load progress bars would bury it."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def parse_args(argv: list[str] | None = None):
    """argparse, except that key=value overrides may also come after the options
    (`tunelab train recipe.yaml --resume run train.lr=1e-4`): argparse alone stops collecting
    a positional list at the first option and rejects what follows."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra and (stray or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        args.fn(args)
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
