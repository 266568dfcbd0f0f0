"""The `tunelab` command: a table of verbs.

    tunelab train [RECIPE.yaml] [key.sub=value ...] [--resume RUN_DIR]
    tunelab check [RECIPE.yaml] [key.sub=value ...]     preflight only: data counts, problems
    tunelab eval RUN_DIR --data FILE
    tunelab predict RUN_DIR --input FILE --output FILE
    tunelab compare [RECIPE.yaml] [key=value ...] --methods full,lora,...
    tunelab export RUN_DIR --to merged|adapter|onnx|int8
    tunelab verify RUN_DIR EXPORT_DIR [EXPORT_DIR ...]
    tunelab serve RUN_DIR|NAME=RUN_DIR ... [--port 8000] [--api-key KEY]   HTTP API
    tunelab methods                                      the method support matrix
    tunelab config                                       every config key with its doc
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tunelab.errors import TunelabError


def cmd_train(args) -> None:
    from tunelab.config import resolve_config
    from tunelab.train.loop import train

    recipe, overrides = split_recipe(args.recipe, args.overrides)
    if args.resume:
        if recipe or overrides:
            raise TunelabError("--resume continues a run with its saved config.yaml; "
                               "give no recipe or overrides with it")
        config = None
    else:
        config = resolve_config(recipe, overrides)
    train(config, resume=args.resume)


def cmd_check(args) -> None:
    from tunelab.config import resolve_config
    from tunelab.tasks import get_task

    recipe, overrides = split_recipe(args.recipe, args.overrides)
    config = resolve_config(recipe, overrides)
    task = get_task(config)
    data = task.load_data()
    print(task.format_preflight(data))
    built = task.build_model(data.labels)
    for split, rows in data.splits.items():
        e = task.encode(built.tokenizer, rows)
        if split == "train" and len(e):
            first = getattr(rows[0], "source", "") if hasattr(rows, "__getitem__") else ""
            print(f"\nfirst training example{f' ({first})' if first else ''}: "
                  + task.show_example(built.tokenizer, e, 0))
        if not len(e):
            continue
        lengths = sorted(e.lengths)
        print(f"{split}: tokens per example median {lengths[len(lengths) // 2]}, "
              f"max {lengths[-1]}, truncated at {config.model.max_length}: {e.truncated}")


def cmd_eval(args) -> None:
    import tunelab
    from tunelab.io import atomic_write_json

    predictor = tunelab.load(args.run_dir, precision=args.precision)
    metrics, tracker, problems = predictor.evaluate_file(args.data, args.format)
    for pr in problems[:10]:
        print(f"skipped {pr.where()}: {pr.reason}", file=sys.stderr)
    if len(problems) > 10:
        print(f"... and {len(problems) - 10} more skipped rows", file=sys.stderr)
    print(tracker.report())
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval" / Path(args.data).stem
    extra = tracker.save_artifacts(out, "eval", Path(args.data).name)
    atomic_write_json(out / "metrics.json", {**metrics, "skipped": len(problems), **extra,
                                             "data": args.data})
    print(f"\nwritten: {out / 'metrics.json'}, {out / 'confusion.png'}")


def cmd_predict(args) -> None:
    import tunelab
    from tunelab.data.readers import write_rows

    predictor = tunelab.load(args.run_dir, precision=args.precision, batch_size=args.batch_size)
    out_rows = predictor.predict_file(args.input, args.format)
    write_rows(args.output, out_rows, args.out_format or "auto")
    print(f"{len(out_rows)} predictions written to {args.output}", file=sys.stderr)


def cmd_compare(args) -> None:
    import datetime as dt

    from tunelab.compare import compare, parse_methods

    recipe, overrides = split_recipe(args.recipe, args.overrides)
    out = args.out or f"runs/compare-{dt.datetime.now():%Y%m%d-%H%M%S}"
    rows = compare(recipe, overrides, parse_methods(args.methods), out)
    print((Path(out) / "comparison.md").read_text())
    failed = [r["method"] for r in rows if r["status"] != "ok"]
    print(f"written to {out}/comparison.{{md,csv,json,png}}"
          + (f"; failed: {', '.join(failed)} (logs beside them)" if failed else ""))


def cmd_export(args) -> None:
    from tunelab.export import export

    for kind in args.to.split(","):
        out = export(args.run_dir, kind.strip(), args.out if "," not in args.to else None)
        print(f"{kind}: {out}")


def cmd_verify(args) -> None:
    import tunelab
    from tunelab.data.classification import read_prediction_inputs
    from tunelab.verify import format_checks, verify

    data = args.data
    if data is None:
        import importlib.resources

        data = str(importlib.resources.files("tunelab.demo") / "sst2_test.csv")
    config = tunelab.load(args.run_dir).config
    _, examples = read_prediction_inputs(data, config.data if args.data else
                                         type(config.data)(), "auto")
    examples = examples[:args.n]
    pairs = [e.text_pair or "" for e in examples] if any(e.text_pair for e in examples) else None
    checks = verify(args.run_dir, args.exports, [e.text for e in examples], pairs)
    print(format_checks(checks, len(examples)))
    if not all(c.passed for c in checks):
        raise TunelabError("some exports differ from the run beyond their tolerance")


def cmd_serve(args) -> None:
    from tunelab.serve.app import ServeSettings, serve

    serve(args.runs, ServeSettings(
        host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, max_texts=args.max_texts,
        max_chars=args.max_chars, precision=args.precision, threads=args.threads))


def cmd_methods(args) -> None:
    from tunelab.methods.registry import all_methods

    try:
        from tunelab.methods.table import format_methods_table

        print(format_methods_table())
    except ImportError:
        for spec in all_methods():
            print(f"{spec.name:<18} lr {spec.default_lr:<8g} mergeable {spec.mergeable!s:<6} "
                  f"{spec.summary}")


def cmd_config(args) -> None:
    from tunelab.config import describe_fields

    for key, default, doc in describe_fields():
        print(f"{key} = {default}\n    {doc}")


def split_recipe(recipe: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`tunelab train a=b` has no recipe: the first word is then an override."""
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *overrides]
    return recipe, list(overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description=(
        "Adapt pretrained transformers to your task, then evaluate, compare and predict."))
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="train a model from a recipe (default: MiniLM on the demo set)")
    p.add_argument("recipe", nargs="?", help="recipe YAML (optional)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=3e-4")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.set_defaults(fn=cmd_train)

    p = verbs.add_parser("check", help="preflight a recipe's data and show a tokenised example")
    p.add_argument("recipe", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_check)

    p = verbs.add_parser("eval", help="evaluate a run on a labelled file")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="labelled file (same columns as training)")
    p.add_argument("--format", default="auto")
    p.add_argument("--out", help="folder for metrics.json and confusion.png")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.set_defaults(fn=cmd_eval)

    p = verbs.add_parser("predict", help="label every row of a file")
    p.add_argument("run_dir")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", default="auto", help="input format")
    p.add_argument("--out-format", help="output format (default: from the output extension)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.set_defaults(fn=cmd_predict)

    p = verbs.add_parser("compare", help="train a recipe with several methods and tabulate them")
    p.add_argument("recipe", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--methods", help="comma-separated (default: every method the model supports)")
    p.add_argument("--out", help="output folder (default: runs/compare-<date>-<time>)")
    p.set_defaults(fn=cmd_compare)

    p = verbs.add_parser("export", help="export a run: merged, adapter, onnx, int8")
    p.add_argument("run_dir")
    p.add_argument("--to", required=True, help="merged, adapter, onnx or int8 (comma-separated)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/export/KIND)")
    p.set_defaults(fn=cmd_export)

    p = verbs.add_parser("verify", help="check exports give the run's outputs on probe inputs")
    p.add_argument("run_dir")
    p.add_argument("exports", nargs="+")
    p.add_argument("--data", help="probe file (default: the packaged demo test texts)")
    p.add_argument("-n", type=int, default=256, help="number of probe inputs")
    p.set_defaults(fn=cmd_verify)

    p = verbs.add_parser("serve", help="serve runs over HTTP (many adapters share one base)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder, or NAME=RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' or 'X-API-Key: KEY' "
                        "(default: $TUNELAB_API_KEY; unset = no key)")
    p.add_argument("--max-batch", type=int, default=64, help="texts per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests")
    p.add_argument("--queue-size", type=int, default=256,
                   help="requests that may wait; beyond it: 503")
    p.add_argument("--max-texts", type=int, default=256, help="texts per request")
    p.add_argument("--max-chars", type=int, default=10000, help="characters per text")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for inference (default 0: every usable core)")
    p.set_defaults(fn=cmd_serve)

    p = verbs.add_parser("methods", help="list adaptation methods and what they support")
    p.set_defaults(fn=cmd_methods)
    p = verbs.add_parser("config", help="list every config key with its default and doc")
    p.set_defaults(fn=cmd_config)
    return parser


def quiet_libraries() -> None:
    """tunelab reports what matters itself (new head, parameters that train); the libraries'
    load reports and per-load progress bars would bury it."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
