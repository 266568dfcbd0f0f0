"""Exports give the same outputs as the run they came from (merged, adapter, ONNX, int8)."""
import json

import pytest
import torch

from tunelab.cli import main


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bert, toy_data):
    run = tmp_path_factory.mktemp("exp") / "run"
    args = [f"model.name={tiny_bert}", f"data.train={toy_data['train']}",
            f"data.test={toy_data['test']}", "train.lr=5e-3", "train.batch_size=4",
            "train.epochs=10", "train.precision=fp32", "train.threads=1", "train.tracker=none",
            "model.max_length=32", "method.name=lora", f"run_dir={run}"]
    assert main(["train", *args]) == 0
    return run


def test_merged_loads_without_tunelab_and_matches(lora_run, toy_data, capsys):
    assert main(["export", str(lora_run), "--to", "merged,adapter,onnx,int8"]) == 0
    merged = lora_run / "export" / "merged"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert model.config.id2label == {0: "negative", 1: "positive"}
    tok = AutoTokenizer.from_pretrained(merged)
    import tunelab

    texts = ["the film was great", "a dull boring plot"]
    ref = tunelab.load(lora_run, precision="fp32").logits(texts)
    with torch.no_grad():
        out = model(**tok(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    adapter = lora_run / "export" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").exists()

    # int8: SmoothQuant's multiplies before the quantised MatMuls (query, key, value, attention
    # output, intermediate); the feed-forward output projections (weights intermediate x
    # hidden), pooler and classifier stay fp32
    import onnx

    graph = onnx.load(str(lora_run / "export" / "int8" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    layers, intermediate = model.config.num_hidden_layers, model.config.intermediate_size
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == 5 * layers
    weights = {t.name: list(t.dims) for t in graph.initializer}
    fp32 = [weights.get(n.input[1]) for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    hidden = model.config.hidden_size
    assert [w for w in fp32 if w] == [[intermediate, hidden]] * layers + [[hidden, hidden],
                                                                          [hidden, 2]]

    capsys.readouterr()
    exports = [str(lora_run / "export" / k) for k in ("merged", "adapter", "onnx", "int8")]
    assert main(["verify", str(lora_run), *exports, "--data", toy_data["test"]]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok ") == 4 and "FAIL" not in out


def test_verify_fails_on_a_drifted_export(lora_run, toy_data, capsys):
    assert main(["export", str(lora_run), "--to", "merged", "--out",
                 str(lora_run.parent / "drift")]) == 0
    from safetensors.torch import load_file, save_file

    path = lora_run.parent / "drift" / "model.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if k.startswith("classifier") and k.endswith("bias"))
    state[key] = state[key] + 0.5
    save_file(state, str(path), metadata={"format": "pt"})
    assert main(["verify", str(lora_run), str(lora_run.parent / "drift"),
                 "--data", toy_data["test"]]) == 2
    assert "FAIL" in capsys.readouterr().out


def test_full_run_has_no_adapter_export(tiny_overrides, tmp_path, capsys):
    assert main(["train", *tiny_overrides, "train.epochs=1"]) == 0
    assert main(["export", str(tmp_path / "run"), "--to", "adapter"]) == 2
    assert "--to merged" in capsys.readouterr().err
    meta_dir = tmp_path / "run" / "export" / "merged"
    assert main(["export", str(tmp_path / "run"), "--to", "merged"]) == 0
    assert json.loads((meta_dir / "export.json").read_text())["kind"] == "merged"
