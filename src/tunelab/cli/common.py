"""Helpers the `tunelab` verb handlers share: telling a recipe from a leading override, and
loading a finished classification run for the verbs that need one."""
from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError


def split_recipe(recipe: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`tunelab train a=b` has no recipe: the first word is then an override."""
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *overrides]
    return recipe, list(overrides)


def load_classifier(run_dir: str, what: str):
    """The Predictor of a finished classification run; other tasks are a clear error."""
    import tunelab
    from tunelab import runs

    config, _, _ = runs.read_run(Path(run_dir))
    if config.task.name != "classification":
        raise TunelabError(f"{what} {run_dir} is a {config.task.name} run; this command needs "
                           "a classification run")
    return tunelab.load(run_dir)
