"""tunelab: adapt pretrained transformers to your task, then evaluate, compare, export and serve."""

from pathlib import Path

__version__ = "0.1.0"


def load(run_dir, **kwargs):
    """Load a finished run for prediction: ``tunelab.load("runs/x").predict(["text"])``; the
    predictor's kind follows the run's task (labels, entity spans, generated text)."""
    from tunelab import runs
    from tunelab.tasks import get_task

    config, _, _ = runs.read_run(Path(run_dir))
    return get_task(config).load_predictor(run_dir, **kwargs)
