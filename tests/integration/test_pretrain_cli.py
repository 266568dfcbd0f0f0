"""`tunelab pretrain` end to end on tiny models: from scratch (mlm, causal_lm) the held-out
perplexity falls; continued MLM of a BERT without an MLM head trains a new head; a pretrain run
is a `model:` for classification; an interrupted run resumes to the same result."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tunelab.cli import main
from tunelab.config import resolve_config
from tunelab.pretrain import pretrain_config
from tunelab.tasks import get_task

from conftest import toy_rows

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our neighbour"]
VERBS = ["sees", "likes", "finds", "helps", "calls"]
OBJECTS = ["the river", "a small house", "the old tree", "a blue car", "the green park"]
FAST = ["model.max_length=32", "train.batch_size=16", "train.threads=1", "train.precision=fp32",
        "train.tracker=none", "train.log_every=5", "train.warmup_ratio=0.0"]


def records(run, split=None):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r.get("split") == split]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    # one cache for the module: later tests reuse tokenizers and token files built earlier
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path_factory.getbasetemp() / "lm-cache"))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """Sentences with a learnable structure: subject verb object, then a fixed ending."""
    rng = random.Random(0)
    lines = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} every day ."
             for _ in range(600)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def initial_perplexity(overrides):
    """Held-out perplexity of the model a run starts from (same seed, same tokenizer)."""
    from tunelab.train.evaluate import evaluate

    task = get_task(pretrain_config(None, overrides))
    data = task.load_data()
    built = task.build_model([])
    encoded = task.encode(built.tokenizer, data.splits["validation"])
    metrics, _ = evaluate(task, built.model, encoded, [], 64, built.tokenizer.pad_token_id,
                          torch.device("cpu"), False)
    return metrics["perplexity"]


def test_mlm_from_scratch_lowers_perplexity_and_writes_a_usable_run(corpus_file, tmp_path,
                                                                    capsys):
    run = tmp_path / "mlm"
    overrides = [f"data.train={corpus_file}", "model.size=tiny", "model.vocab_size=300",
                 "train.max_steps=40", "train.eval_every=20", "train.lr=2e-3", *FAST]
    assert main(["pretrain", *overrides, f"run_dir={run}"]) == 0
    for name in ("model/model.safetensors", "model/tokenizer.json", "config.yaml",
                 "results.json", "state/latest"):
        assert (run / name).exists(), name
    assert json.loads((run / "label_map.json").read_text()) == {}
    preflight = json.loads((run / "preflight.json").read_text())["splits"]
    assert preflight["train"]["documents"] == 540 and preflight["validation"]["documents"] == 60
    final = json.loads((run / "results.json").read_text())["validation"]["perplexity"]
    start = initial_perplexity(overrides)  # a random model: about the vocabulary size
    assert final < start / 4, (start, final)
    predictor = tunelab.load(run)
    filled = predictor.fill_mask(["the cat [MASK] the river every day ."], top_k=3)[0]
    assert len(filled["masks"]) == 1 and len(filled["masks"][0]) == 3
    assert filled["masks"][0][0]["token"] in filled["filled"].split()
    masked = tmp_path / "masked.txt"
    masked.write_text("a dog [MASK] the old tree\nmy <mask> calls a blue car\n")
    assert main(["predict", str(run), "--input", str(masked), "--output",
                 str(tmp_path / "filled.csv")]) == 0
    rows = (tmp_path / "filled.csv").read_text().splitlines()
    assert rows[0] == "text,filled,top" and len(rows) == 3 and rows[1].count("|") == 4
    # `tunelab eval` on text: perplexity of a file, written beside the run
    held = tmp_path / "held.txt"
    held.write_text("the teacher helps a blue car every day .\n" * 20)
    assert main(["eval", str(run), "--data", str(held), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["perplexity"] < start / 4 and metrics["n"] > 0
    # `tunelab check` shows a masked block
    capsys.readouterr()
    assert main(["check", "task.name=mlm", f"data.train={corpus_file}", "model.size=tiny",
                 "model.vocab_size=300", "model.max_length=32"]) == 0
    shown = capsys.readouterr().out
    assert "⟨" in shown and "[CLS]" in shown


def test_prelayernorm_mlm_without_dropout_learns_and_fine_tunes(corpus_file, tmp_path,
                                                                 tiny_overrides):
    run = tmp_path / "preln"
    overrides = [f"data.train={corpus_file}", "model.size=tiny", "model.vocab_size=300",
                 "model.architecture=roberta-prelayernorm", "model.dropout=0.0",
                 "train.max_steps=40", "train.eval_every=40", "train.lr=2e-3", *FAST]
    built = get_task(pretrain_config(None, overrides)).build_model([])
    assert built.model.config.model_type == "roberta-prelayernorm"
    assert built.model.config.hidden_dropout_prob == 0.0
    assert main(["pretrain", *overrides, f"run_dir={run}"]) == 0
    final = json.loads((run / "results.json").read_text())["validation"]["perplexity"]
    start = initial_perplexity(overrides)
    assert final < start / 4, (start, final)
    # the run is a `model:` for classification: encoder loaded, a new head on top
    cls_config = resolve_config(overrides=[o for o in tiny_overrides
                                           if not o.startswith("model.name=")]
                                + [f"model.name={run}"])
    cls_built = get_task(cls_config).build_model(["negative", "positive"])
    saved = load_file(str(run / "model" / "model.safetensors"))
    emb = "roberta_prelayernorm.embeddings.word_embeddings.weight"
    assert torch.equal(cls_built.model.state_dict()[emb], saved[emb])
    assert cls_built.head_modules and all(h.startswith("classifier")
                                          for h in cls_built.head_modules)


def test_architecture_must_suit_the_objective(corpus_file, capsys):
    assert main(["pretrain", f"data.train={corpus_file}", "model.size=tiny",
                 "model.architecture=llama", *FAST]) == 2
    assert "cannot train mlm" in capsys.readouterr().err
    assert main(["pretrain", f"data.train={corpus_file}", "model.name=minilm",
                 "model.dropout=0.0", *FAST]) == 2
    assert "only with model.size" in capsys.readouterr().err


def test_causal_lm_from_scratch_generates_and_predicts(corpus_file, tmp_path):
    run = tmp_path / "clm"
    overrides = ["task=causal_lm", f"data.train={corpus_file}", "model.size=tiny",
                 "model.vocab_size=400", "train.max_steps=60", "train.eval_every=30",
                 "train.lr=2e-3", *FAST]
    assert main(["pretrain", *overrides, f"run_dir={run}"]) == 0
    final = json.loads((run / "results.json").read_text())["validation"]["perplexity"]
    assert final < initial_perplexity(overrides) / 20 and final < 3.0
    predictor = tunelab.load(run)
    text = predictor.generate(["the cat sees"], max_new_tokens=12)[0]
    assert "every day" in text, text
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog likes\nmy friend\n")
    out = tmp_path / "gen.jsonl"
    assert main(["predict", str(run), "--input", str(prompts), "--output", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a dog likes", "my friend"]
    assert all(r["generated"] for r in rows)


def test_continued_mlm_trains_a_new_head_then_classification_uses_the_run(
        tiny_bert, tiny_overrides, tmp_path):
    texts = tmp_path / "domain.txt"
    texts.write_text("\n".join(r["text"] for r in toy_rows(300, 5)) + "\n")
    overrides = [f"model.name={tiny_bert}", f"data.train={texts}", "train.max_steps=60",
                 "train.eval_every=60", "train.lr=1e-3", *FAST]
    built = get_task(pretrain_config(None, overrides)).build_model([])
    # the BertModel folder has no MLM head: it is new (tied decoder aside) and reported so
    assert built.head_modules and all(h.startswith("cls.predictions") for h in built.head_modules)
    before = {k: v.clone() for k, v in built.model.state_dict().items() if k.startswith("cls.")}
    run = tmp_path / "dapt"
    assert main(["pretrain", *overrides, f"run_dir={run}"]) == 0
    saved = load_file(str(run / "model" / "model.safetensors"))
    head = "cls.predictions.transform.dense.weight"
    assert head in saved and not torch.equal(saved[head], before[head])
    final = json.loads((run / "results.json").read_text())["validation"]["perplexity"]
    start = initial_perplexity(overrides)
    assert final < start / 1.5, (start, final)

    # classification from the pretrain run: its encoder is loaded, only the head is new
    cls_config = resolve_config(overrides=[o for o in tiny_overrides
                                           if not o.startswith("model.name=")]
                                + [f"model.name={run}"])
    cls_built = get_task(cls_config).build_model(["negative", "positive"])
    emb = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(cls_built.model.state_dict()[emb], saved[emb])
    assert cls_built.head_modules and all(h.startswith(("classifier", "bert.pooler"))
                                          for h in cls_built.head_modules)
    assert main(["train", *[o for o in tiny_overrides if not o.startswith("model.name=")],
                 f"model.name={run}"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test"]["accuracy"] >= 0.75


def test_resume_after_interruption_gives_the_same_run(corpus_file, tmp_path, monkeypatch):
    from tunelab.train import loop

    base = ["pretrain", f"data.train={corpus_file}", "model.size=tiny", "model.vocab_size=300",
            "task.whole_word_mask=true", "train.max_steps=30", "train.save_every=10",
            "train.eval_every=15", *FAST]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main([*base, f"run_dir={straight}"]) == 0

    original = loop.after_step

    def interrupt(p, spec, model, optimizer, scheduler, state, *rest):
        original(p, spec, model, optimizer, scheduler, state, *rest)
        if state.step == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "after_step", interrupt)
    assert main([*base, f"run_dir={cut}"]) == 130
    monkeypatch.setattr(loop, "after_step", original)
    assert not (cut / "results.json").exists()
    assert (cut / "state" / "latest").read_text() == "checkpoint-20"
    assert main(["pretrain", "--resume", str(cut)]) == 0
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((cut / "results.json").read_text())
    assert b["validation"]["loss"] == pytest.approx(a["validation"]["loss"], rel=1e-6)
    la = {r["step"]: r["loss"] for r in records(straight)}
    lb = {r["step"]: r["loss"] for r in records(cut)}
    assert sorted(la) == sorted(lb) == [5, 10, 15, 20, 25, 30]
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-6), step


def test_pretrain_errors_are_clear(tmp_path, capsys):
    assert main(["pretrain", "model.size=tiny"]) == 2
    assert "needs a corpus" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "x"}\n')
    assert main(["pretrain", f"data.train={bad}", "model.size=tiny"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "data.text_column" in err and "Traceback" not in err
    assert main(["pretrain", f"data.train={bad}", "data.text_column=sentence", "model.size=tiny",
                 "method.name=lora"]) == 2
    assert "use method.name=full" in capsys.readouterr().err
