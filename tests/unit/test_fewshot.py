"""The k-per-class sampler, SetFit's pairs, its head, and SetFit end to end on a tiny BERT."""
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import toy_rows

from tunelab.data.classification import Example
from tunelab.errors import ConfigError, DataError
from tunelab.fewshot import (SetFitClassifier, SetFitSettings, generate_pairs,
                             head_probabilities, sample_k_per_class, setfit_settings)

LABELS = ["positive", "negative"]


def _examples(rows):
    return [Example(r["text"], LABELS.index(r["label"]), source=f"toy:{i + 2}")
            for i, r in enumerate(rows)]


def test_sampler_draws_exactly_k_per_class_deterministically():
    pool = [Example(f"t{i}", label) for i, label in enumerate([0] * 10 + [1] * 6 + [2] * 4)]
    sample = sample_k_per_class(pool, 4, seed=0)
    assert Counter(e.label for e in sample) == {0: 4, 1: 4, 2: 4}
    assert all(e in pool for e in sample)
    assert [pool.index(e) for e in sample] == sorted(pool.index(e) for e in sample)
    assert sample == sample_k_per_class(pool, 4, seed=0)
    draws = {tuple(e.text for e in sample_k_per_class(pool, 4, seed=s)) for s in range(5)}
    assert len(draws) > 1  # the seed changes the draw
    with pytest.raises(DataError, match="class 'c' has 4 examples; 5 per class"):
        sample_k_per_class(pool, 5, seed=0, labels=["a", "b", "c"])
    with pytest.raises(DataError, match="class 'd' has 0 examples"):
        sample_k_per_class(pool, 1, seed=0, labels=["a", "b", "c", "d"])


def test_pairs_are_balanced_and_labelled_by_class_agreement():
    labels = [0, 0, 0, 1, 1, 2]
    pairs = generate_pairs(labels, iterations=5, seed=3)
    assert len(pairs) == 2 * 5 * len(labels)
    positives = [p for p in pairs if p[2] == 1.0]
    negatives = [p for p in pairs if p[2] == 0.0]
    assert len(positives) == len(negatives) == 30
    assert all(labels[a] == labels[b] for a, b, _ in positives)
    assert all(labels[a] != labels[b] for a, b, _ in negatives)
    # every example anchors exactly one positive and one negative pair per round
    assert Counter(a for a, _, _ in positives) == {i: 5 for i in range(6)}
    assert all(a != b for a, b, _ in positives if labels.count(labels[a]) > 1)
    assert generate_pairs(labels, 5, 3) == pairs
    assert generate_pairs(labels, 5, 4) != pairs
    with pytest.raises(DataError, match="at least 2 classes"):
        generate_pairs([1, 1, 1], 2, 0)


def test_head_probabilities_match_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    for classes in (2, 3):
        x = rng.normal(size=(60, 5))
        y = np.arange(60) % classes
        head = LogisticRegression(max_iter=1000).fit(x, y)
        assert np.allclose(head_probabilities(x, head.coef_, head.intercept_),
                           head.predict_proba(x), atol=1e-10)


def test_settings_from_dicts_validate():
    s = setfit_settings({"num_iterations": 3, "method": {"name": "lora", "r": 4}})
    assert s.num_iterations == 3 and s.method.name == "lora" and s.method.settings.r == 4
    assert setfit_settings({"method": "bitfit"}).method.name == "bitfit"
    with pytest.raises(ConfigError, match="unknown key setfit.iterations"):
        setfit_settings({"iterations": 3})
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        SetFitSettings(batch_size=0)


def _accuracy(clf, examples):
    probs = clf.predict_proba([e.text for e in examples])
    return float((probs.argmax(1) == np.array([e.label for e in examples])).mean())


@pytest.fixture(scope="module")
def toy_split():
    pool, test = _examples(toy_rows(80, 11)), _examples(toy_rows(60, 12))
    return sample_k_per_class(pool, 8, seed=0), test


def test_setfit_learns_from_8_per_class_and_reloads_identically(tiny_bert, toy_split, tmp_path):
    train, test = toy_split
    from sklearn.linear_model import LogisticRegression

    settings = SetFitSettings(lr=3e-3, num_iterations=20, max_length=32, seed=0)
    clf = SetFitClassifier(tiny_bert, LABELS, settings)
    texts, labels = [e.text for e in train], [e.label for e in train]
    # the same head on the encoder before contrastive training: what the pairs add
    untuned = LogisticRegression(max_iter=1000).fit(clf.embed(texts).numpy(), labels)
    before = untuned.score(clf.embed([e.text for e in test]).numpy(), [e.label for e in test])
    clf.fit(texts, labels)
    assert len(clf.losses) == (2 * 20 * 16) // 16  # 640 pairs in batches of 16
    assert np.mean(clf.losses[-5:]) < np.mean(clf.losses[:5]) / 5  # the contrastive loss fell
    after = _accuracy(clf, test)
    # chance is 0.5; some test rows hold a sentiment word none of the 16 examples has
    assert after >= 0.75 and after >= before + 0.1, (before, after)
    preds = clf.predict([test[0].text])
    assert preds[0]["label"] in LABELS and abs(sum(preds[0]["scores"].values()) - 1) < 1e-9
    folder = clf.save(tmp_path / "setfit")
    assert (folder / "encoder" / "model.safetensors").is_file()
    again = SetFitClassifier.load(folder)
    texts = [e.text for e in test]
    assert np.array_equal(again.predict_proba(texts), clf.predict_proba(texts))
    assert again.labels == LABELS and again.base_model == tiny_bert


def test_setfit_with_lora_saves_only_the_adapter(tiny_bert, toy_split, tmp_path, heap_calls):
    train, test = toy_split
    settings = setfit_settings({"num_iterations": 2, "max_length": 32,
                                "method": {"name": "lora", "r": 4}})
    clf = SetFitClassifier(tiny_bert, LABELS, settings).fit([e.text for e in train],
                                                            [e.label for e in train])
    assert heap_calls == ["keep", "release"]  # kept while the body trains, as `train` does
    folder = clf.save(tmp_path / "lora")
    assert not (folder / "encoder").exists()
    from safetensors.torch import load_file

    keys = list(load_file(str(folder / "adapter.safetensors")))
    assert keys and all("lora_" in k for k in keys)
    again = SetFitClassifier.load(folder)
    texts = [e.text for e in test[:10]]
    assert np.array_equal(again.predict_proba(texts), clf.predict_proba(texts))


def test_setfit_with_kept_embedding_gradients_trains_as_torch_does(tiny_bert, toy_split,
                                                                    monkeypatch):
    """The encoder's embeddings' gradients added into kept tensors (train/embedding_grads,
    for tables of MIN_ROWS rows and more) give the same training as torch's dense ones."""
    from tunelab.train import embedding_grads

    train, _ = toy_split
    texts, labels = [e.text for e in train], [e.label for e in train]
    runs = []
    for min_rows in (10**9, 1):
        monkeypatch.setattr(embedding_grads, "MIN_ROWS", min_rows)
        clf = SetFitClassifier(tiny_bert, LABELS, SetFitSettings(lr=3e-3, num_iterations=5,
                                                                 max_length=32, seed=0))
        clf.fit(texts, labels)
        runs.append((clf.losses, clf.embed(texts)))
    assert any(m.sparse for m in clf.encoder.modules() if isinstance(m, torch.nn.Embedding))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-6)
