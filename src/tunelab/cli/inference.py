"""Handlers of the verbs that use a finished run on data: `tunelab eval` (a labelled file),
`predict` (label every row of a file), `generate` and `chat` (instruction runs or causal LMs)."""
from __future__ import annotations

import sys
from pathlib import Path


def cmd_eval(args) -> None:
    import tunelab
    from tunelab.io import atomic_write_json

    predictor = tunelab.load(args.run_dir, precision=args.precision, merge=args.merge)
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
    written = [out / "metrics.json"] + sorted(out.glob("*.png"))
    print("\nwritten: " + ", ".join(str(w) for w in written))


def cmd_predict(args) -> None:
    import tunelab
    from tunelab.data.readers import write_rows

    from tunelab import exported

    if exported.is_export(args.run_dir):  # onnx/int8: the engine `tunelab serve` runs it with
        predictor = exported.load(args.run_dir, batch_size=args.batch_size)
    else:
        predictor = tunelab.load(args.run_dir, precision=args.precision,
                                 batch_size=args.batch_size, merge=args.merge)
    out_rows = predictor.predict_file(args.input, args.format)
    write_rows(args.output, out_rows, args.out_format or "auto")
    print(f"{len(out_rows)} predictions written to {args.output}", file=sys.stderr)


def cmd_generate(args) -> None:
    from tunelab.generate import load_generator

    generator = load_generator(args.model, precision=args.precision)
    results = generator.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                                 system=args.system, seed=args.seed)
    for i, (prompt, result) in enumerate(zip(args.prompt, results), start=1):
        if len(results) > 1:
            print(f"--- {i}: {prompt if len(prompt) <= 60 else prompt[:57] + '...'}")
        print(result.text)
        end = ("stopped at eos" if result.finished
               else f"hit --max-new-tokens {args.max_new_tokens} before eos")
        print(f"[{result.new_tokens} new tokens, {end}]", file=sys.stderr)


def cmd_chat(args) -> None:
    from tunelab.generate import load_generator

    generator = load_generator(args.model, precision=args.precision)
    generator.chat(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, system=args.system, seed=args.seed)
