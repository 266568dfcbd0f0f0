"""Token attributions on tiny runs trained on the toy set: completeness of integrated gradients,
the sentiment word found, sub-words merged, adapter and decoder models, HTML and PNG written."""
import json

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, toy_rows

import tunelab
from tunelab.cli import main
from tunelab.errors import ConfigError
from tunelab.explain import explain, explanations_html, format_explanation, write_explanations


@pytest.fixture(scope="module")
def runs(tiny_bert, toy_data, tmp_path_factory):
    """A full and a LoRA run on the 20 toy rows; the full run keeps its last (lowest-loss)
    weights rather than an early lucky checkpoint."""
    root = tmp_path_factory.mktemp("explain_runs")
    common = [f"model.name={tiny_bert}", f"data.train={toy_data['train']}",
              f"data.validation={toy_data['validation']}", f"data.test={toy_data['test']}",
              "train.batch_size=4", "train.epochs=20", "train.precision=fp32",
              "train.threads=1", "train.tracker=none", "model.max_length=32",
              "train.warmup_ratio=0.0", "train.metric=loss"]
    out = {}
    for name, lr in (("full", "1e-3"), ("lora", "5e-3")):
        out[name] = root / name
        assert main(["train", *common, f"method.name={name}", f"train.lr={lr}",
                     f"run_dir={out[name]}"]) == 0
    return out


@pytest.fixture(scope="module")
def full(runs):
    return tunelab.load(runs["full"])


def baseline_logits(predictor, text, pair=None):
    """Logits of the text with every word token replaced by [PAD], computed independently."""
    enc = predictor.tokenizer(text, pair, return_tensors="pt")
    ids = enc["input_ids"]
    specials = torch.tensor([i in (predictor.tokenizer.cls_token_id,
                                   predictor.tokenizer.sep_token_id) for i in ids[0]])
    enc["input_ids"] = torch.where(specials, ids, predictor.tokenizer.pad_token_id)
    with torch.no_grad():
        return predictor.model(**enc).logits[0]


def test_integrated_gradients_are_complete(full):
    texts = ["the film was great", "a boring plot and very dull acting",
             "the movie was a bad story"]
    found = explain(full, texts, steps=50)
    logits = full.logits(texts)
    for e, row, text in zip(found, logits, texts):
        target = full.labels.index(e.label)
        assert e.label == e.predicted == full.labels[int(row.argmax())]
        assert e.logit == pytest.approx(float(row[target]), abs=1e-5)
        assert e.baseline_logit == pytest.approx(float(baseline_logits(full, text)[target]),
                                                 abs=1e-5)
        gap = e.logit - e.baseline_logit
        assert abs(gap) > 0.05  # a trained model: the words matter
        assert sum(e.token_scores) == pytest.approx(gap, abs=1e-3 * abs(gap) + 1e-6)
        assert abs(e.delta) < 1e-3 * abs(gap) + 1e-6
        assert e.token_scores[0] == e.token_scores[-1] == 0.0  # [CLS], [SEP] kept in baseline
        assert sum(e.word_scores) == pytest.approx(sum(e.token_scores), abs=1e-5)
        assert e.score == pytest.approx(float(row.softmax(-1)[target]), abs=1e-5)


def test_the_sentiment_word_gets_the_largest_attribution(full):
    rows = toy_rows(24, 3)  # the toy test split: one sentiment word among fillers
    found = explain(full, [r["text"] for r in rows])
    right = [(r, e) for r, e in zip(rows, found) if e.label == r["label"]]
    assert len(right) >= 18
    hits = 0
    for row, e in right:
        [signal] = [w for w in e.words if w in POSITIVE + NEGATIVE]
        top, score = e.top(1)[0]
        hits += top == signal and score > 0  # the strongest push toward the label
    # ~7 words a sentence: chance is 1 in 7; tiny runs reach 0.6-0.75 depending on the seed
    assert hits >= 0.5 * len(right), f"{hits} of {len(right)}"


def test_gradient_x_input_is_gradient_times_embedding(full):
    text = "the movie was a bad story"
    [e] = explain(full, [text], method="gxi")
    enc = full.tokenizer(text, return_tensors="pt")
    embeds = full.model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_()
    logit = full.model(inputs_embeds=embeds, attention_mask=enc["attention_mask"],
                       token_type_ids=enc["token_type_ids"]).logits[0, full.labels.index(e.label)]
    (grad,) = torch.autograd.grad(logit, embeds)
    assert e.token_scores == pytest.approx((grad * embeds).sum(-1)[0].tolist(), abs=1e-6)
    assert e.delta is None and e.baseline_logit is None


def test_words_are_merged_from_subwords_and_keep_their_spelling(full):
    text = "A <b>Superb</b> cast, really!"
    [e] = explain(full, [text], steps=8)
    assert e.words == ["A", "<", "b", ">", "Superb", "<", "/", "b", ">", "cast", ",", "really",
                       "!"]
    pieces = [t for t in e.tokens if t.startswith("##")]
    assert pieces  # the tiny vocabulary splits 'superb' into sub-words ...
    assert len(e.tokens) - 2 > len(e.words)  # ... whose scores are summed per word
    assert sum(e.word_scores) == pytest.approx(sum(e.token_scores), abs=1e-6)
    text_out = format_explanation(e)
    assert "Superb(" in text_out and "top: " in text_out


def test_pairs_and_a_chosen_label(full):
    [e] = explain(full, ["the film was great"], ["dull"], label="negative")
    assert (e.label, e.predicted) == ("negative", "positive")
    assert e.words == ["the", "film", "was", "great"] and e.pair_words == ["dull"]
    gap = e.logit - e.baseline_logit
    assert e.baseline_logit == pytest.approx(
        float(baseline_logits(full, "the film was great", "dull")[0]), abs=1e-5)
    assert sum(e.word_scores) + sum(e.pair_scores) == pytest.approx(gap, abs=1e-3)
    assert e.word_scores[3] < 0  # 'great' argues against 'negative'
    assert f"negative {e.score:.3f} (predicted: positive " in explanations_html([e])
    with pytest.raises(ConfigError, match="negative, positive"):
        explain(full, ["x"], label="neutral")
    with pytest.raises(ConfigError, match="ig .* gxi"):
        explain(full, ["x"], method="shap")
    with pytest.raises(ConfigError, match="one per text"):
        explain(full, ["x", "y"], ["z"])


def test_an_adapter_run_leaves_the_served_model_untouched(runs):
    predictor = tunelab.load(runs["lora"], merge=False)  # the adapter kept apart from the base
    assert type(predictor.model).__name__.startswith("PeftModel")
    texts = ["the film was great", "a dull plot", "superb cast"]
    before = predictor.logits(texts)
    found = explain(predictor, texts)
    for e in found:
        gap = e.logit - e.baseline_logit
        assert sum(e.token_scores) == pytest.approx(gap + e.delta, abs=1e-5)
        assert abs(e.delta) < 0.05 * abs(gap) + 1e-6
    assert torch.equal(predictor.logits(texts), before)
    assert not predictor.model.training
    assert all(not m._forward_hooks for m in predictor.model.modules())
    assert not any(p.grad is not None for p in predictor.model.parameters())


def test_decoder_models_with_pad_as_eos(tmp_path):
    """A Llama-like classifier (byte-level BPE, pad = eos, last-token pooling)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.models import build_tiny_model
    from tunelab.predict import Predictor

    folder = build_tiny_model(tmp_path / "llama", kind="llama",
                              texts=[r["text"] for r in toy_rows(100, 0)], vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    predictor = Predictor(model, tokenizer, ["no", "yes"], 32, bf16=False)
    texts = ["the film was great", "a dull plot"]
    found = explain(predictor, texts, steps=256)  # a random model is far from linear
    logits = predictor.logits(texts)
    for e, row in zip(found, logits):
        assert e.logit == pytest.approx(float(row.max()), abs=1e-5)
        gap = e.logit - e.baseline_logit
        assert sum(e.token_scores) == pytest.approx(gap + e.delta, abs=1e-5)
        assert abs(e.delta) < 0.01 * abs(gap) + 1e-4
    assert found[1].words == ["a", "dull", "plot"]


def test_html_png_and_json_are_written(full, tmp_path):
    found = explain(full, ["the film was great", "a <i>dull</i> plot"], ["fine", "it"])
    paths = write_explanations(found, tmp_path, "runs/x", steps=50)
    assert [p.name for p in paths] == ["explanations.json", "explanations.html",
                                       "explanation_001.png", "explanation_002.png"]
    for png in paths[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 3000
    data = json.loads((tmp_path / "explanations.json").read_text())
    assert data["run"] == "runs/x" and data["steps"] == 50
    assert data["explanations"][0]["words"] == ["the", "film", "was", "great"]
    assert data["explanations"][1]["pair_words"] == ["it"]
    page = (tmp_path / "explanations.html").read_text()
    assert page.count("<p>") == 2 and "&lt;i&gt;" not in page  # words, not markup
    assert ">&lt;<" in page and "<i>" not in page  # '<' is a word here, escaped
    great = found[0].word_scores[3]
    colour = "220,38,38" if great > 0 else "37,99,235"
    assert f'style="background:rgba({colour},0.850)" title="{great:+.4f}">great<' in page
    assert f"{found[0].label} {found[0].score:.3f}" in explanations_html(found)
