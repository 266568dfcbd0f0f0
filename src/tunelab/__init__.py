"""tunelab: adapt pretrained transformers to your task, then evaluate, compare, export and serve."""

__version__ = "0.1.0"


def load(run_dir, **kwargs):
    """Load a finished run for prediction: ``tunelab.load("runs/x").predict(["text"])``."""
    from tunelab.predict import Predictor

    return Predictor.from_run(run_dir, **kwargs)
