"""The CLI end to end on a tiny model built in code: files written, loss down, reload exact."""
import json
from pathlib import Path

import pytest
import torch

import tunelab
from tunelab.cli import main
from tunelab.train import memory


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_train_full_writes_a_self_describing_run(tiny_overrides, tmp_path):
    assert main(["train", *tiny_overrides]) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "env.json", "label_map.json", "preflight.json", "metrics.jsonl",
                 "results.json", "model/model.safetensors", "model/tokenizer.json",
                 "state/latest", "confusion_test.png"):
        assert (run / name).exists(), name
    logs = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r and "split" not in r]
    assert logs[-1]["loss"] < logs[0]["loss"] * 0.85, logs  # from chance (ln 2 = 0.693)
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["accuracy"] >= 0.75
    assert results["train"]["trainable_percent"] == pytest.approx(100.0)
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 42 and env["precision"] == "fp32" and len(env["config_hash"]) == 16
    assert env["dropout"] == "fast (16-bit masks)"
    assert env["freed_memory"] == ("kept for reuse" if memory.glibc() else "malloc's default")
    assert json.loads((run / "label_map.json").read_text()) == {"0": "negative", "1": "positive"}
    preflight = json.loads((run / "preflight.json").read_text())
    assert preflight["splits"]["train"]["rows"] == 20


def test_lora_run_reloads_with_identical_predictions(tiny_overrides, toy_data, tmp_path):
    # 20 training rows: LoRA dropout (off by default) keeps the tiny model from overfitting
    assert main(["train", *tiny_overrides, "method.name=lora", "train.lr=5e-3",
                 "method.dropout=0.1"]) == 0
    run = tmp_path / "run"
    assert (run / "adapter" / "weights.safetensors").exists() and not (run / "model").exists()
    assert json.loads((run / "env.json").read_text())["fused_lora_layers"] > 0  # trained fused
    from safetensors.torch import load_file

    saved = load_file(str(run / "adapter" / "weights.safetensors"))
    assert any("classifier" in k for k in saved), "the head must be saved with the adapter"
    assert any("lora_A" in k for k in saved)
    results = json.loads((run / "results.json").read_text())
    # the reloaded model reproduces the metrics computed on the in-memory model before saving
    from tunelab.data.classification import load_labeled_file

    predictor = tunelab.load(run)
    examples, _ = load_labeled_file(toy_data["test"], predictor.config.data, predictor.labels)
    metrics, _ = predictor.evaluate(examples)
    assert metrics["accuracy"] == results["test"]["accuracy"]
    assert metrics["loss"] == pytest.approx(results["test"]["loss"], abs=1e-6)
    texts = ["the film was great", "a boring plot"]
    again = tunelab.load(run).logits(texts)
    assert torch.equal(predictor.logits(texts), again)
    preds = predictor.predict(texts)
    assert [p["label"] for p in preds] == [predictor.labels[i] for i in again.argmax(-1)]
    # loaded for prediction, LoRA is folded into the base weights; merge=False keeps it apart
    assert not type(predictor.model).__name__.startswith("Peft")
    assert not any("lora_" in name for name, _ in predictor.model.named_parameters())
    apart = tunelab.load(run, merge=False)
    assert type(apart.model).__name__.startswith("Peft")
    torch.testing.assert_close(apart.logits(texts), again, rtol=1e-4, atol=1e-5)
    for flag, name in (([], "merged.jsonl"), (["--no-merge"], "apart.jsonl")):
        assert main(["predict", str(run), "--input", toy_data["test"],
                     "--output", str(tmp_path / name), *flag]) == 0
    merged, kept = read_jsonl(tmp_path / "merged.jsonl"), read_jsonl(tmp_path / "apart.jsonl")
    assert [r["predicted_label"] for r in merged] == [r["predicted_label"] for r in kept]
    assert [r["score"] for r in merged] == pytest.approx([r["score"] for r in kept], abs=1e-5)
    assert sum(preds[0]["scores"].values()) == pytest.approx(1.0)
    assert results["test"]["accuracy"] >= 0.6


def test_freeze_trains_head_only(tiny_overrides, tmp_path):
    assert main(["train", *tiny_overrides, "method.name=freeze", "train.epochs=1"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 < results["train"]["trainable_percent"] < 5


def test_eval_and_predict_commands(tiny_overrides, toy_data, tmp_path, capsys):
    assert main(["train", *tiny_overrides]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["eval", str(run), "--data", toy_data["test"]]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out and "positive" in out
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert metrics["accuracy"] == results["test"]["accuracy"]
    assert (run / "eval" / "test" / "confusion_eval.png").stat().st_size > 1000
    out_file = tmp_path / "pred.jsonl"
    assert main(["predict", str(run), "--input", toy_data["test"], "--output", str(out_file)]) == 0
    rows = read_jsonl(out_file)
    assert len(rows) == 24
    assert {"text", "label", "predicted_label", "score"} <= set(rows[0])
    agree = sum(r["label"] == r["predicted_label"] for r in rows) / len(rows)
    assert agree == pytest.approx(results["test"]["accuracy"])


def test_user_errors_are_one_clear_line(tiny_overrides, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhello,positive\n")
    assert main(["train", *tiny_overrides, f"data.train={bad}"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "'text'" in err and "sentence" in err
    assert "Traceback" not in err
    assert main(["train", "train.nope=1"]) == 2
    assert "unknown key train.nope" in capsys.readouterr().err


def test_refuses_to_overwrite_a_finished_run(tiny_overrides, capsys):
    assert main(["train", *tiny_overrides, "train.epochs=1"]) == 0
    assert main(["train", *tiny_overrides, "train.epochs=1"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_tensorboard_tracker_writes_events(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if o != "train.tracker=none"]
    assert main(["train", *overrides, "train.epochs=2", "train.tracker=tensorboard"]) == 0
    events = list((tmp_path / "run" / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_check_command_shows_a_tokenised_example(tiny_overrides, capsys):
    assert main(["check", *tiny_overrides]) == 0
    out = capsys.readouterr().out
    assert "first training example" in out and "[CLS]" in out and "train" in out


def test_early_stopping_and_best_checkpoint(tiny_overrides, tmp_path):
    # a learning rate of ~0 cannot improve accuracy after the first evaluation
    assert main(["train", *tiny_overrides, "train.lr=1e-9", "train.eval_every=5",
                 "train.early_stopping_patience=2"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["stopped_early"] is True
    assert results["train"]["steps"] == 15  # evaluations at 5 (best), 10, 15 -> stop
    assert results["train"]["best_step"] == 5


def test_gradient_checkpointing_gives_the_same_loss(tiny_overrides, tmp_path):
    common = [o for o in tiny_overrides if not o.startswith("run_dir=")] + ["train.epochs=2"]
    assert main(["train", *common, f"run_dir={tmp_path / 'a'}"]) == 0
    assert main(["train", *common, "train.gradient_checkpointing=true",
                 f"run_dir={tmp_path / 'b'}"]) == 0
    la = [r["loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "split" not in r]
    lb = [r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "split" not in r]
    assert lb == pytest.approx(la, rel=1e-4)


GROUPED = {"adalora": 0, "ia3": 0}  # their wrappers on the projections keep them apart
"""Methods whose query, key and value projections are not one group per layer in bf16
(`tunelab.train.grouped`); the others have the tiny model's two."""


@pytest.mark.parametrize("method", ["adalora", "adapter_houlsby", "bitfit", "freeze", "ia3",
                                    "lora", "prefix", "prompt"])
def test_bf16_trains_every_adapter_method(method, tiny_overrides, tmp_path):
    """bf16 autocast under each method's own wrapping; the saved run loads and predicts in
    fp32."""
    overrides = [o for o in tiny_overrides if o not in ("train.precision=fp32",
                                                        "train.epochs=20")]
    assert main(["train", *overrides, f"method.name={method}", "train.precision=bf16",
                 "train.max_steps=2"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["test"]["accuracy"] <= 1
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["grouped_projections"] == GROUPED.get(method, 2)
    predictions = tunelab.load(tmp_path / "run", precision="fp32").predict(["a good film"])
    assert predictions[0]["label"] in ("positive", "negative")
    # in bf16 the loaded weights are frozen and each linear layer keeps its cast (on CPU its
    # oneDNN layout): the same logits as autocast casting at every batch
    from torch import nn

    from tunelab.train.frozen import CachedCastLinear, _can_pack

    texts = ["a good film", "the plot was dull and far too long"]
    for merge in (True, False):
        predictor = tunelab.load(tmp_path / "run", precision="bf16", merge=merge)
        kept = predictor.logits(texts)
        layers = [m for m in predictor.model.modules() if type(m) is CachedCastLinear]
        assert layers and not any(p.requires_grad for p in predictor.model.parameters())
        packed = [m for m in layers if "_pack_cache" in m.__dict__]  # those that ran
        assert bool(packed) == _can_pack()
        for m in layers:
            m.__class__ = nn.Linear
        assert torch.equal(kept, predictor.logits(texts))


def test_bf16_training_runs_and_is_recorded(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if o != "train.precision=fp32"]
    assert main(["train", *overrides, "train.precision=bf16", "train.epochs=2",
                 "train.fast_dropout=false"]) == 0
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["precision"] == "bf16" and env["dropout"] == "torch"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["precision"] == "bf16"


def test_each_log_line_may_trim_the_heap(tiny_overrides, tmp_path, monkeypatch):
    """Batches change shape every step and glibc's heap fragments; each log line asks the
    trimmer, which hands the free pages back once resident memory has grown (unit tests in
    test_memory.py)."""
    from tunelab.train import memory

    calls = []
    real = memory.HeapTrimmer.__call__
    monkeypatch.setattr(memory.HeapTrimmer, "__call__", lambda self: calls.append(real(self)))
    overrides = [o for o in tiny_overrides if o != "train.epochs=20"]
    assert main(["train", *overrides, "train.max_steps=12", "train.log_every=4"]) == 0
    logged = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r
              and "split" not in r]
    assert len(calls) == len(logged) == 3


def test_kept_embedding_gradients_train_as_torch_does(tiny_overrides, tmp_path, monkeypatch):
    """The embeddings' gradients added row by row into kept tensors (train/embedding_grads)
    train to the same weights as torch's dense gradients (train.keep_embedding_grads=false)."""
    from safetensors.torch import load_file

    from tunelab.train import embedding_grads

    monkeypatch.setattr(embedding_grads, "MIN_ROWS", 1)  # the tiny model's tables are small
    overrides = [o for o in tiny_overrides if o != "train.epochs=20"]
    overrides += ["train.max_steps=8", "train.eval_every=null"]
    weights, kept = [], []
    for keep in ("false", "true"):
        run = tmp_path / f"run-{keep}"
        assert main(["train", *overrides, f"train.keep_embedding_grads={keep}",
                     f"run_dir={run}"]) == 0
        weights.append(load_file(run / "model" / "model.safetensors"))
        kept.append(json.loads((run / "env.json").read_text())["kept_embedding_grads"])
    assert kept[0] == 0 and kept[1] >= 2  # word, position (and token-type) tables
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_run_served_in_bf16_reports_what_it_trained(tiny_overrides, tmp_path):
    """Loaded for bf16 prediction every weight is frozen; the server still reports the
    parameters the run trained."""
    from tunelab.serve.pool import ModelPool

    assert main(["train", *tiny_overrides, "train.max_steps=2"]) == 0
    trained = json.loads((tmp_path / "run" / "results.json").read_text())["train"]
    served = ModelPool(precision="bf16").add("full", tmp_path / "run")
    assert not any(p.requires_grad for p in served.predictor.model.parameters())
    assert served.describe()["trainable_params"] == trained["trainable_params"] > 0
