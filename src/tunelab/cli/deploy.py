"""Handlers of the verbs that ship and watch a finished run: `tunelab export`, `verify`
(exports and a live server against the run), `serve` (the HTTP API), `monitor` (negative share
per topic and window, with alerts) and `explain` (token attributions)."""
from __future__ import annotations

import sys
from pathlib import Path

from tunelab.cli.common import load_classifier
from tunelab.errors import TunelabError


def cmd_export(args) -> None:
    from tunelab.export import export

    for kind in args.to.split(","):
        out = export(args.run_dir, kind.strip(), args.out if "," not in args.to else None)
        print(f"{kind}: {out}")


def cmd_verify(args) -> None:
    from tunelab import runs
    from tunelab.data.classification import read_prediction_inputs
    from tunelab.verify import Server, format_checks, verify

    if not args.exports and args.url is None:
        raise TunelabError("nothing to verify: give EXPORT_DIR folders, --url of a running "
                           "tunelab serve, or both")
    data = args.data
    if data is None:
        import importlib.resources

        data = str(importlib.resources.files("tunelab.demo") / "sst2_test.csv")
    config = runs.read_run(Path(args.run_dir))[0]
    _, examples = read_prediction_inputs(data, config.data if args.data else
                                         type(config.data)(), "auto")
    examples = examples[:args.n]
    pairs = [e.text_pair or "" for e in examples] if any(e.text_pair for e in examples) else None
    server = Server(args.url, args.model, args.api_key) if args.url else None
    checks = verify(args.run_dir, args.exports, [e.text for e in examples], pairs, server)
    print(format_checks(checks, len(examples)))
    if not all(c.passed for c in checks):
        raise TunelabError("some targets differ from the run beyond their tolerance")


def cmd_serve(args) -> None:
    from tunelab.serve.app import ServeSettings, serve

    serve(args.runs, ServeSettings(
        host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, max_texts=args.max_texts,
        max_chars=args.max_chars, precision=args.precision, threads=args.threads,
        max_new_tokens=args.max_new_tokens, generation_queue=args.generation_queue))


def cmd_monitor(args) -> None:
    from tunelab import monitor
    from tunelab.monitor_report import format_report
    from tunelab.data.readers import read_rows

    watcher = monitor.Monitor(
        load_classifier(args.run, "--run"),
        topic_predictor=load_classifier(args.topic_run, "--topic-run") if args.topic_run
        else None, window=args.window, time_column=args.time_column,
        text_column=args.text_column, topic_column=args.topic_column,
        negative_label=args.negative_label, threshold=args.threshold, change=args.change,
        min_count=args.min_count, skip_bad=args.skip_bad)
    if args.input == "-":
        source, rows, name = "<stdin>", monitor.read_stream(sys.stdin), "stdin"
    else:
        source, rows, name = args.input, read_rows(args.input), Path(args.input).stem
    out = Path(args.out) if args.out else Path(args.run) / "monitor" / name
    monitor.run(watcher, rows, out, source=source, follow=args.follow,
                emit=lambda message: print(message, flush=True))
    if watcher.texts == 0:
        raise TunelabError(f"{source}: no usable rows" + (
            f"; first problem: {watcher.problems[0]}" if watcher.problems else ""))
    print(format_report(watcher, source))
    print(f"written to {out}/: report.md, series.csv, alerts.csv, alerts.jsonl, trend.png")


def cmd_explain(args) -> None:
    from tunelab.explain import explain, format_explanation, write_explanations

    if args.pair and len(args.pair) != len(args.text):
        raise TunelabError(f"{len(args.pair)} --pair for {len(args.text)} --text: give one "
                           "--pair per --text, in the same order")
    predictor = load_classifier(args.run_dir, "RUN_DIR")
    explanations = explain(predictor, args.text, args.pair, label=args.label,
                           method=args.method, steps=args.steps)
    for i, e in enumerate(explanations, start=1):
        print(f"[{i}] {format_explanation(e)}")
    out = Path(args.out) if args.out else Path(args.run_dir) / "explain"
    write_explanations(explanations, out, str(args.run_dir),
                       args.steps if args.method == "ig" else None)
    print(f"\nwritten to {out}/: explanations.html, explanations.json and a PNG heat-map "
          f"per text (explanation_001.png ...)")
