"""Zero-shot scorers: similarity on an encoder whose embeddings are a bag of words, LM scoring
and contextual calibration on a fake LM with known logits, NLI on a fake and a trained run."""
import math
import random
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import write_csv

from tunelab.errors import ConfigError, DataError, ModelError
from tunelab.lm_scoring import LMScorer, calibrate
from tunelab.zeroshot import (NLIScorer, SimilarityScorer, ZeroShotClassifier, ZeroShotSettings,
                              entailment_index, labels_from_names, load_label_file, render)

SPORT = ["football", "goal", "match", "team", "score"]
FOOD = ["recipe", "oven", "bake", "flour", "sugar"]
FILLER = ["the", "a", "was", "today", "great", "really", "this", "is", "about"]


def _texts(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.sample(SPORT + FOOD + FILLER, 6)) for _ in range(n)]


@pytest.fixture(scope="module")
def bow_encoder(tmp_path_factory):
    """A 1-layer BERT whose layer is a no-op (attention and feed-forward outputs zeroed) and
    whose position/type/special-token embeddings are zero: a sentence embedding is then the
    normalised mean of its words' random vectors, so cosine similarity counts shared words."""
    from transformers import AutoModel, AutoTokenizer

    from tunelab.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("bow") / "src", kind="bert",
                            texts=_texts(), vocab_size=300, hidden=512, layers=1, heads=2)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    with torch.no_grad():
        emb = model.embeddings
        emb.position_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
        emb.word_embeddings.weight.normal_(generator=torch.Generator().manual_seed(0))
        for special in tok.all_special_ids:
            emb.word_embeddings.weight[special].zero_()
        for layer in model.encoder.layer:
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
    folder = tmp_path_factory.mktemp("bow") / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    for word in SPORT + FOOD:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    return str(folder)


def test_similarity_picks_the_label_whose_description_shares_words(bow_encoder):
    spec = labels_from_names("sport,cooking")
    spec.descriptions = {"sport": ["football match"], "cooking": ["oven recipe"]}
    clf = ZeroShotClassifier.load(bow_encoder, spec, ZeroShotSettings(scorer="similarity"))
    rng = random.Random(1)
    texts, gold = [], []
    for i in range(20):
        word = rng.choice(["football", "match"] if i % 2 == 0 else ["oven", "recipe"])
        texts.append(" ".join(rng.sample(FILLER, 3) + [word]))
        gold.append("sport" if i % 2 == 0 else "cooking")
    preds = clf.predict(texts)
    assert [p["label"] for p in preds] == gold
    probs = clf.probabilities(texts)
    assert torch.allclose(probs.sum(-1), torch.ones(len(texts)))
    assert (probs.max(-1).values > 0.9).all()  # temperature 0.05 makes shared words decisive


def test_aggregate_max_and_mean_over_descriptions(bow_encoder):
    from transformers import AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(bow_encoder), AutoTokenizer.from_pretrained(bow_encoder)
    spec = labels_from_names("a,b")
    spec.descriptions = {"a": ["football", "sugar flour bake"], "b": ["football goal"]}
    picks = {}
    for how in ("max", "mean"):
        settings = ZeroShotSettings(aggregate=how)
        scorer = SimilarityScorer(model, tok, render(spec, settings.rendered_templates()), settings)
        sims = scorer.similarities(["football"])[0]
        picks[how] = spec.names[int(sims.argmax())]
        if how == "max":
            assert sims[0] == pytest.approx(1.0, abs=1e-5)  # identical text: cosine 1
    # max: 'a' has the exact phrase (1.0 > ~0.71); mean: its unrelated phrase pulls it to ~0.5
    assert picks == {"max": "a", "mean": "b"}


def test_templates_render_every_description_and_lower_temperature_sharpens(bow_encoder,
                                                                            tmp_path):
    spec = _label_file(tmp_path, {"sport": ["football", "team"], "cooking": "oven"})
    assert render(spec, ["This is {}.", "{}"]) == [
        ["This is football.", "football", "This is team.", "team"],
        ["This is oven.", "oven"]]
    sharp = ZeroShotClassifier.load(bow_encoder, spec, ZeroShotSettings(temperature=0.01))
    soft = ZeroShotClassifier.load(bow_encoder, spec, ZeroShotSettings(temperature=1.0))
    text = ["the team was great"]
    assert sharp.predict(text)[0]["label"] == soft.predict(text)[0]["label"] == "sport"
    assert sharp.predict(text)[0]["score"] > soft.predict(text)[0]["score"]
    with pytest.raises(ConfigError, match="exactly once"):
        ZeroShotSettings(templates=["no slot"])


def _label_file(folder, tree):
    path = folder / "labels.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_label_file(path)


def test_label_file_forms_and_errors(tmp_path):
    spec = _label_file(tmp_path, {
        "negative": ["terrible", "bad"], "neutral": None,
        "positive": {"descriptions": ["great"], "verbalizers": ["good", "great"]}})
    assert spec.names == ["negative", "neutral", "positive"]  # file order = id order
    assert spec.descriptions == {"negative": ["terrible", "bad"], "neutral": ["neutral"],
                                 "positive": ["great"]}
    assert spec.verbalizers["negative"] == ["terrible", "bad"]
    assert spec.verbalizers["positive"] == ["good", "great"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("positive: {descriptions: [great], words: [x]}\nnegative: bad\n")
    with pytest.raises(DataError, match=r"bad.yaml.*unknown key 'words'"):
        load_label_file(bad)
    bad.write_text("positive: [great, '']\nnegative: bad\n")
    with pytest.raises(DataError, match="non-empty"):
        load_label_file(bad)
    with pytest.raises(ConfigError, match="at least 2 labels"):
        labels_from_names("only")


# --------------------------------------------------------------------------------------------
# lm scorer


class FakeLM(torch.nn.Module):
    """Next-token logits = bias, plus `boost` on the boosted tokens once token `trigger` has
    appeared: a model whose label probabilities are known exactly."""

    def __init__(self, vocab, bias, trigger=None, boosted=(), boost=0.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.bias, self.trigger, self.boost = bias, trigger, boost
        self.mask = torch.zeros(vocab)
        self.mask[list(boosted)] = 1.0
        self.positions = []

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0):
        self.positions.append(position_ids)
        seen = ((input_ids == self.trigger).cumsum(-1) > 0).float() if self.trigger is not None \
            else torch.zeros(input_ids.shape)
        logits = self.bias + self.boost * seen[..., None] * self.mask  # (B, T, V)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


LM_TEXTS = ["Text: wow what a film\nLabel: positive", "Text: meh\nLabel: negative",
            "very negative thing", "N/A"] * 50


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tunelab.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("llama") / "m", kind="llama",
                                texts=LM_TEXTS, vocab_size=600, hidden=32, layers=2))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _label_logp(bias, tokens, boost_vec=None):
    logits = bias if boost_vec is None else bias + boost_vec
    logp = logits.log_softmax(-1)
    return float(sum(logp[t] for t in tokens) / len(tokens))


def test_contextual_calibration_divides_out_the_content_free_prior(llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    neg, pos, trigger = _ids(tok, " negative"), _ids(tok, " positive"), _ids(tok, " wow")
    assert len(trigger) == 1 and not set(neg) & set(pos)
    vocab = len(tok)
    bias = torch.zeros(vocab)
    bias[neg] = 3.0  # the model's prior leans to 'negative' whatever the text
    lm = FakeLM(vocab, bias, trigger[0], pos, boost=2.0)
    spec = labels_from_names("negative,positive")
    verbs = [spec.verbalizers[n] for n in spec.names]
    raw = LMScorer(lm, tok, verbs, ZeroShotSettings(scorer="lm", calibrate=False))
    cal = LMScorer(lm, tok, verbs, ZeroShotSettings(scorer="lm"))
    texts = ["wow what a film", "meh"]
    # uncalibrated: the prior wins for both texts
    assert raw.probabilities(texts).argmax(-1).tolist() == [0, 0]
    boost = torch.zeros(vocab)
    boost[pos] = 2.0
    p_plain = torch.tensor([_label_logp(bias, neg), _label_logp(bias, pos)]).softmax(-1)
    p_wow = torch.tensor([_label_logp(bias, neg, boost), _label_logp(bias, pos, boost)]).softmax(-1)
    assert torch.allclose(cal.content_free(), p_plain, atol=1e-6)  # no trigger in "N/A" etc.
    expected_wow = (p_wow / p_plain) / (p_wow / p_plain).sum()
    got = cal.probabilities(texts)
    assert torch.allclose(got[0], expected_wow, atol=1e-6)
    assert torch.allclose(got[1], torch.tensor([0.5, 0.5]), atol=1e-6)
    assert got[0].argmax() == 1  # calibration lets the text's evidence decide
    assert torch.allclose(calibrate(torch.tensor([[0.6, 0.4]]), torch.tensor([0.75, 0.25])),
                          torch.tensor([[1 / 3, 2 / 3]]))


def test_length_normalisation_averages_label_token_log_probs(llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    bias = torch.randn(len(tok), generator=torch.Generator().manual_seed(0))
    lm = FakeLM(len(tok), bias)
    verbs = [["positive"], ["very negative thing"]]
    long = _ids(tok, " very negative thing")
    assert len(long) > 1
    logp = bias.log_softmax(-1)
    total = float(sum(logp[t] for t in long))
    for norm, expected in ((True, total / len(long)), (False, total)):
        scorer = LMScorer(lm, tok, verbs, ZeroShotSettings(scorer="lm", length_norm=norm))
        scores = scorer.label_log_scores(["anything"])[0]
        assert scores[1] == pytest.approx(expected, abs=1e-5)
        assert scores[0] == pytest.approx(float(sum(logp[t] for t in _ids(tok, " positive")))
                                          / (len(_ids(tok, " positive")) if norm else 1),
                                          abs=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_left_padded_batches_score_like_single_sequences(kind, llama_dir, tmp_path):
    """Llama's rotary positions are relative, so only GPT-2's absolute position embeddings
    show whether the padding shifted the positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.tiny import build_tiny_model

    folder = llama_dir if kind == "llama" else str(build_tiny_model(
        tmp_path / "gpt2", kind="gpt2", texts=LM_TEXTS, vocab_size=600, hidden=32, layers=2))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    verbs = [["negative", "very negative thing"], ["positive"]]
    texts = ["wow", "a much longer text about a film that was wow", "meh meh"]
    one = LMScorer(model, tok, verbs, ZeroShotSettings(scorer="lm", batch_size=1))
    many = LMScorer(model, tok, verbs, ZeroShotSettings(scorer="lm", batch_size=16))
    assert torch.allclose(one.verbalizer_log_probs(texts), many.verbalizer_log_probs(texts),
                          atol=1e-5)
    mean = LMScorer(model, tok, verbs, ZeroShotSettings(scorer="lm", aggregate="mean"))
    lp = one.verbalizer_log_probs(texts)
    expected = torch.logsumexp(lp[:, :2], 1) - math.log(2)
    assert torch.allclose(mean.label_log_scores(texts)[:, 0], expected, atol=1e-5)


def test_lm_scorer_refuses_an_encoder(bow_encoder):
    with pytest.raises(ConfigError, match="causal LM"):
        ZeroShotClassifier.load(bow_encoder, labels_from_names("a,b"),
                                ZeroShotSettings(scorer="lm"))


# --------------------------------------------------------------------------------------------
# nli scorer


class FakeNLI:
    """Entailment logit = 3 x the hypothesis words found in the premise."""

    labels = ["contradiction", "entailment", "neutral"]

    def logits(self, texts, pairs):
        rows = []
        for premise, hypothesis in zip(texts, pairs):
            overlap = len(set(premise.split()) & set(hypothesis.rstrip(".").split()[-1:]))
            rows.append([1.0, 3.0 * overlap, 1.0])
        return torch.tensor(rows)


def test_nli_uses_the_entailment_label_found_by_name():
    spec = labels_from_names("football,oven")
    settings = ZeroShotSettings(scorer="nli")
    scorer = NLIScorer(FakeNLI(), render(spec, settings.rendered_templates()), settings)
    assert scorer.entailment == 1
    probs = scorer.probabilities(["the football was great", "a hot oven"])
    assert probs.argmax(-1).tolist() == [0, 1]
    p_ent = torch.tensor([1.0, 3.0, 1.0]).softmax(-1)[1]
    p_none = torch.tensor([1.0, 0.0, 1.0]).softmax(-1)[1]
    assert probs[0, 0] == pytest.approx(float(p_ent / (p_ent + p_none)), abs=1e-6)
    assert entailment_index(["not_entailment", "Entailment"], None) == 1
    assert entailment_index(["yes", "no"], "yes") == 0
    with pytest.raises(ConfigError, match="entailment-label"):
        entailment_index(["not_entailment", "other"], None)


def test_nli_scorer_on_a_trained_pair_run(tmp_path, tiny_bert):
    from tunelab.config import resolve_config
    from tunelab.train.loop import train

    rng = random.Random(0)
    rows = []
    for i in range(24):
        words = rng.sample(["film", "plot", "cast", "story"], 2)
        hypothesis = f"This example is {words[0] if i % 2 == 0 else 'dull'}."
        rows.append({"text": " ".join(words), "hypothesis": hypothesis,
                     "label": "entailment" if i % 2 == 0 else "not_entailment"})
    data = write_csv(tmp_path / "nli.csv", rows)
    run = train(resolve_config(overrides=[
        f"model.name={tiny_bert}", f"data.train={data}", "data.text_pair_column=hypothesis",
        "data.labels=[not_entailment,entailment]", "train.max_steps=3", "train.batch_size=8",
        "train.tracker=none", "train.precision=fp32", "train.threads=1",
        "model.max_length=32", f"run_dir={tmp_path / 'run'}"]), quiet=True)
    spec = labels_from_names("film,plot")
    clf = ZeroShotClassifier.load(str(run), spec, ZeroShotSettings(scorer="nli"))
    probs = clf.probabilities(["the film", "a plot"])
    logits = clf.scorer.predictor.logits(["the film", "the film"],
                                         ["This example is film.", "This example is plot."])
    ent = logits.softmax(-1)[:, 1]  # entailment is label 1 of this run
    assert torch.allclose(probs[0], ent / ent.sum(), atol=1e-5)
    single = train(resolve_config(overrides=[
        f"model.name={tiny_bert}", f"data.train={data}", "train.max_steps=1",
        "train.tracker=none", "train.precision=fp32", "train.threads=1", "model.max_length=32",
        f"run_dir={tmp_path / 'single'}"]), quiet=True)
    with pytest.raises(ModelError, match="text pairs"):
        ZeroShotClassifier.load(str(single), spec, ZeroShotSettings(scorer="nli"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prompts_run_once_and_score_like_every_pair(kind, llama_dir, tmp_path):
    """score_after_prompts (each prompt once, continuations on its cache) against
    score_continuations over every (prompt, continuation) pair: continuations of 1 to 3
    tokens, prompts of different lengths (left padding), fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.lm_scoring import cache_argument, score_after_prompts, score_continuations
    from tunelab.tiny import build_tiny_model

    folder = llama_dir if kind == "llama" else str(build_tiny_model(
        tmp_path / "gpt2", kind="gpt2", texts=LM_TEXTS, vocab_size=600, hidden=32, layers=2))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [_ids(tok, t) for t in ["Text: wow\nLabel:", "Text: a much longer text about a "
                                      "film that was wow\nLabel:", "meh"]]
    conts = [_ids(tok, w) for w in [" positive", " very negative thing", " N/A"]]
    conts.append(conts[1][:1])  # one token: scored from the prompt alone, beside longer ones
    assert max(len(c) for c in conts) > 1  # the cached path runs
    weights = torch.arange(12.0).view(3, 4)
    for norm in (True, False):  # the scores, and (prompt-based training) their gradients
        model.zero_grad()
        once = score_after_prompts(model, tok, prompts, conts, 64, norm)
        (once * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        pairs = score_continuations(model, tok, [p for p in prompts for _ in conts],
                                    conts * len(prompts), 64, norm).view(3, 4)
        (pairs * weights).sum().backward()
        assert torch.allclose(once, pairs, atol=1e-5)
        for name, param in model.named_parameters():
            assert torch.allclose(grads[name], param.grad, atol=1e-4), name
    assert cache_argument(model) is not None  # LMScorer takes this path for real models
    assert cache_argument(FakeLM(10, torch.zeros(10))) is None  # and pairs for this one
