"""Prompt-based fine-tuning (PET / LM-BFF) on a tiny BERT masked LM and a tiny Llama."""
import json

import numpy as np
import pytest
import torch
from conftest import toy_rows, write_csv

from tunelab.errors import ConfigError
from tunelab.prompting import PromptClassifier, prompt_settings, split_pattern

LABELS = ["positive", "negative"]
VERBALIZERS = {"positive": ["good"], "negative": ["bad"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as train.threads=1 elsewhere: on a shared CPU, several threads per
    tiny matmul cost 10x more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _split(rows):
    return [r["text"] for r in rows], [LABELS.index(r["label"]) for r in rows]


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    """A tiny BertForMaskedLM (random but complete: encoder and MLM head)."""
    from transformers import AutoTokenizer, BertForMaskedLM

    from tunelab.tiny import bert_config, build_tiny_model

    texts = [r["text"] for r in toy_rows(200, 0)] + ["it was good", "it was bad"]
    bare = build_tiny_model(tmp_path_factory.mktemp("prompt") / "bare", kind="bert",
                            texts=texts, vocab_size=160)
    tok = AutoTokenizer.from_pretrained(bare)
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(tok, vocab=max(160, len(tok)), hidden=32, layers=2,
                                        heads=2, intermediate=64, max_position=128))
    folder = bare.parent / "mlm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"mlm": str(folder), "bare": str(bare)}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tunelab.tiny import build_tiny_model

    texts = [r["text"] for r in toy_rows(200, 0)] + ["Review: it was good\nSentiment: good"]
    return str(build_tiny_model(tmp_path_factory.mktemp("prompt") / "llama", kind="llama",
                                texts=texts, vocab_size=400))


def _settings(**kw):
    values = {"verbalizers": VERBALIZERS, "lr": 2e-3, "epochs": 8, "batch_size": 4,
              "max_length": 48, "precision": "fp32", "seed": 0, **kw}
    return prompt_settings(values)


def test_settings_and_patterns_validate():
    assert split_pattern("{text} It was {mask}.") == ["{text}", " It was", "{mask}", "."]
    s = prompt_settings({"patterns": ["a {text} b"], "method": "lora",
                         "verbalizers": {"positive": "great", "negative": ["bad", "awful"]}})
    assert s.method.name == "lora" and s.verbalizers["positive"] == ["great"]
    with pytest.raises(ConfigError, match="must contain {text} once"):
        prompt_settings({"patterns": ["no placeholder"]})
    with pytest.raises(ConfigError, match="unknown key prompt.epoch;"):
        prompt_settings({"epoch": 3})
    with pytest.raises(ConfigError, match="prompt.verbalizers.positive"):
        prompt_settings({"verbalizers": {"positive": []}})
    with pytest.raises(ConfigError, match="prompt.precision"):
        prompt_settings({"precision": "fp16"})


def test_mlm_refuses_multi_token_verbalizers_and_models_without_a_head(tiny_mlm):
    from transformers import AutoTokenizer

    word = "wonderfulacting"
    pieces = AutoTokenizer.from_pretrained(tiny_mlm["mlm"]).tokenize(word)
    assert len(pieces) > 1
    with pytest.raises(ConfigError, match=f"'{word}' of label 'positive' is {len(pieces)} "
                                          "tokens") as e:
        PromptClassifier(tiny_mlm["mlm"], LABELS,
                         _settings(verbalizers={"positive": [word], "negative": ["bad"]}))
    assert str(pieces) in str(e.value)
    with pytest.raises(ConfigError, match="has no masked-LM head.*tunelab pretrain"):
        PromptClassifier(tiny_mlm["bare"], LABELS, _settings())
    with pytest.raises(ConfigError, match="has no {mask}"):
        PromptClassifier(tiny_mlm["mlm"], LABELS, _settings(patterns=["{text} it was"]))
    with pytest.raises(ConfigError, match="missing \\['negative'\\]"):
        PromptClassifier(tiny_mlm["mlm"], LABELS, _settings(verbalizers={"positive": "good"}))


def test_step_zero_scores_are_the_pretrained_heads(tiny_mlm, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from tunelab.lm_scoring import LMScorer
    from tunelab.zeroshot import ZeroShotSettings

    texts = [r["text"] for r in toy_rows(6, 4)]
    # masked LM: log p(word at the mask) from the untouched checkpoint, computed by hand
    clf = PromptClassifier(tiny_mlm["mlm"], LABELS, _settings(patterns=["{text} it was {mask}."]))
    tok = AutoTokenizer.from_pretrained(tiny_mlm["mlm"])
    lm = AutoModelForMaskedLM.from_pretrained(tiny_mlm["mlm"]).eval()
    with torch.no_grad():
        got = clf.label_scores(0, texts)
        for row, text in enumerate(texts):
            enc = tok(f"{text} it was {tok.mask_token}.", return_tensors="pt")
            at = (enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0]
            logp = lm(**enc).logits[0, at].log_softmax(-1)
            want = logp[tok.convert_tokens_to_ids(["good", "bad"])]
            assert torch.allclose(got[row], want, atol=1e-5)
    # causal LM: the zero-shot LM scorer's uncalibrated label scores
    pattern = "Review: {text}\nSentiment:"
    verbs = {"positive": ["good", "fine"], "negative": ["bad"]}  # "fine" pools two words
    clf = PromptClassifier(tiny_llama, LABELS, _settings(patterns=[pattern], verbalizers=verbs))
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    scorer = LMScorer(lm, tok, [verbs[n] for n in LABELS], ZeroShotSettings(
        scorer="lm", prompt=pattern, aggregate="mean", calibrate=False))
    with torch.no_grad():
        assert torch.allclose(clf.label_scores(0, texts), scorer.label_log_scores(texts),
                              atol=1e-5)
    # verbalisers of several tokens: the same scores with gradients (training) as without
    verbs = {"positive": ["good"], "negative": ["very bad thing"]}
    clf = PromptClassifier(tiny_llama, LABELS, _settings(patterns=[pattern], verbalizers=verbs))
    assert max(len(ids) for ids in clf.word_ids) > 1
    clf.models[0].eval()
    trained = clf.label_scores(0, texts)
    assert trained.requires_grad
    with torch.inference_mode():
        assert torch.allclose(clf.label_scores(0, texts), trained.detach(), atol=1e-5)


def test_training_fits_a_separable_toy_set_and_reloads_identically(tiny_mlm, tmp_path, capsys):
    texts, labels = _split(toy_rows(16, 5))
    clf = PromptClassifier(tiny_mlm["mlm"], LABELS, _settings(
        patterns=["{text} it was {mask}."], lr=8e-3, epochs=15, batch_size=8))
    before = (clf.predict_proba(texts).argmax(1) == np.array(labels)).mean()
    clf.fit(texts, labels)
    assert "prompt 1/1" in capsys.readouterr().err  # the progress bar names the pattern
    losses = clf.losses[0]
    assert len(losses) == 15 * 2  # 15 epochs of 16 examples in batches of 8
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) / 3
    after = (clf.predict_proba(texts).argmax(1) == np.array(labels)).mean()
    assert after >= 0.9 and after > before
    preds = clf.predict(texts[:2])
    assert preds[0]["label"] in LABELS and abs(sum(preds[0]["scores"].values()) - 1) < 1e-9
    folder = clf.save(tmp_path / "full")
    assert (folder / "pattern-0" / "model" / "model.safetensors").is_file()
    meta = json.loads((folder / "prompt.json").read_text())
    assert meta["model_kind"] == "masked_lm" and meta["settings"]["verbalizers"] == VERBALIZERS
    again = PromptClassifier.load(folder)
    assert np.array_equal(again.predict_proba(texts), clf.predict_proba(texts))
    assert again.base_model == tiny_mlm["mlm"]


def test_causal_lora_trains_saves_only_the_adapter_and_reloads(tiny_llama, tmp_path,
                                                               heap_calls):
    texts, labels = _split(toy_rows(16, 6))
    settings = _settings(patterns=["Review: {text}\nSentiment: {mask}"], epochs=4,
                         method={"name": "lora", "r": 4}, lr=1e-2)
    clf = PromptClassifier(tiny_llama, LABELS, settings).fit(texts, labels)
    assert heap_calls == ["keep", "release"]  # kept while the pattern's model trains
    assert np.mean(clf.losses[0][-4:]) < np.mean(clf.losses[0][:4])
    folder = clf.save(tmp_path / "lora")
    assert not (folder / "pattern-0" / "model").exists()
    from safetensors.torch import load_file

    keys = list(load_file(str(folder / "pattern-0" / "adapter.safetensors")))
    assert keys and all("lora_" in k for k in keys)
    again = PromptClassifier.load(folder)
    assert np.array_equal(again.predict_proba(texts), clf.predict_proba(texts))


def test_pattern_ensemble_averages_the_patterns_probabilities(tiny_mlm):
    texts, labels = _split(toy_rows(8, 7))
    patterns = ["{text} it was {mask}.", "{mask} film {text}"]
    both = PromptClassifier(tiny_mlm["mlm"], LABELS, _settings(patterns=patterns, epochs=2))
    both.fit(texts, labels)
    singles = [PromptClassifier(tiny_mlm["mlm"], LABELS, _settings(patterns=[p], epochs=2))
               .fit(texts, labels) for p in patterns]
    per_pattern = both.pattern_probabilities(texts)
    for index, single in enumerate(singles):  # each pattern trained as if it were alone
        assert np.allclose(per_pattern[index], single.predict_proba(texts), atol=1e-6)
    assert not np.allclose(per_pattern[0], per_pattern[1], atol=1e-3)
    assert np.allclose(both.predict_proba(texts), per_pattern.mean(0))


def test_fewshot_eval_runs_the_prompt_method(tiny_mlm, tmp_path):
    from tunelab import fewshot_eval as fe

    pool = write_csv(tmp_path / "pool.csv", toy_rows(20, 8))
    test = write_csv(tmp_path / "test.csv", toy_rows(10, 9))
    overrides = [f"model.name={tiny_mlm['mlm']}", f"data.train={pool}", f"data.test={test}",
                 "train.tracker=none", "prompt.epochs=2", "prompt.precision=fp32",
                 'prompt.patterns=["{text} it was {mask}."]',
                 "prompt.verbalizers={positive: good, negative: bad}"]
    plan = fe.make_plan(None, overrides, fe.parse_methods("prompt"), [4], [0])
    results = fe.fewshot_eval(plan, tmp_path / "out")
    assert [(r["method"], r["k"], r["seed"]) for r in results["runs"]] == [("prompt", 4, 0)]
    assert 0 <= results["runs"][0]["accuracy"] <= 1
    assert results["prompt"]["epochs"] == 2
    assert "| prompt | 4 |" in (tmp_path / "out" / "results.md").read_text()


def test_kept_embedding_gradients_train_a_tied_masked_lm_as_torch_does(tiny_mlm, monkeypatch):
    """Full fine-tuning through the pattern trains the word embedding, tied to the MLM
    head's output layer: kept gradients (train/embedding_grads) give the same losses."""
    from tunelab.train import embedding_grads

    texts, labels = _split(toy_rows(16, 5))
    losses = []
    for min_rows in (10**9, 1):
        monkeypatch.setattr(embedding_grads, "MIN_ROWS", min_rows)
        clf = PromptClassifier(tiny_mlm["mlm"], LABELS, _settings(
            patterns=["{text} it was {mask}."], lr=8e-3, epochs=3, batch_size=8))
        clf.fit(texts, labels)
        losses.append(clf.losses[0])
    assert any(m.sparse for m in clf.models[0].modules() if isinstance(m, torch.nn.Embedding))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, atol=1e-7)
