"""Command-line parsing: overrides may come before or after the options."""
import pytest

from tunelab.cli import parse_args


def test_overrides_after_options_are_collected():
    args = parse_args(["fewshot-eval", "recipe.yaml", "setfit.lr=1e-5", "--k", "8",
                       "selftrain.rounds=1", "--seeds", "0", "finetune.epochs=5"])
    assert args.recipe == "recipe.yaml"
    assert args.overrides == ["setfit.lr=1e-5", "selftrain.rounds=1", "finetune.epochs=5"]
    assert (args.k, args.seeds) == ("8", "0")


def test_stray_words_are_still_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(["fewshot-eval", "recipe.yaml", "--k", "8", "oops"])
    assert "unrecognized arguments: oops" in capsys.readouterr().err


def test_verbs_without_overrides_reject_key_values(capsys):
    with pytest.raises(SystemExit):
        parse_args(["methods", "train.lr=1"])
    assert "unrecognized arguments: train.lr=1" in capsys.readouterr().err
