"""tunelab: adapt pretrained transformers to your task, then evaluate, compare, export and serve."""

from pathlib import Path

__version__ = "0.1.0"


def load(run_dir, **kwargs):
    """Load a finished run for prediction: ``tunelab.load("runs/x").predict(["text"])``; the
    predictor's kind follows the run's task (labels, entity spans, generated text). An onnx or
    int8 export folder (`tunelab export`) loads into ONNX Runtime (`threads`, `batch_size`)."""
    from tunelab import exported, runs
    from tunelab.tasks import get_task

    if exported.is_export(run_dir):
        return exported.load(run_dir, **kwargs)

    config, _, _ = runs.read_run(Path(run_dir))
    return get_task(config).load_predictor(run_dir, **kwargs)
