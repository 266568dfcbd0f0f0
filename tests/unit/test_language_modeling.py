"""Masked and causal LM pieces without a training loop: masking, label shift, loss and metrics,
the streamed corpus and its token cache, tokenizer training, and the pretrain config rules."""
import json
import math
import os
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tunelab import tiny
from tunelab.config import resolve_config
from tunelab.data import corpus
from tunelab.data.corpus import Source, TokenBlocks, expand_paths, load_corpus, token_blocks
from tunelab.errors import ConfigError, DataError
from tunelab.pretrain import pretrain_config, scratch_tokenizer
from tunelab.tasks import get_task
from tunelab.tasks.language_modeling import (Encoded, LanguageModelMetrics, _encoder_and_head,
                                             mask_tokens, shift_labels, vocab_info)

WORDS = ["the", "cat", "sat", "on", "mat", "unbelievably", "extraordinary", "dog", "ran",
         "park", "tokenization", "river", "house", "blue", "playground"]


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def wordpiece():
    # small vocabulary: long words split into several pieces (whole-word masking has groups)
    return tiny.train_tokenizer("bert", sentences(200), 60, 64)


def mlm_task(*overrides):
    return get_task(resolve_config(overrides=["task.name=mlm", "data.train=x.txt",
                                              *overrides]))


def random_blocks(tokenizer, n_rows=64, width=128, seed=0):
    """(B, T) ids of real text with [CLS] ... [SEP] documents, plus padding in the last row."""
    ids = tokenizer(sentences(n_rows * width // 6, seed))["input_ids"]
    flat = [t for x in ids for t in x][:n_rows * width]
    batch = torch.tensor(flat).view(n_rows, width)
    attention = torch.ones_like(batch)
    attention[-1, width // 2:] = 0
    batch[-1, width // 2:] = tokenizer.pad_token_id
    return batch, attention


# --------------------------------------------------------------------------------------------
# masking


def test_masking_rates_and_special_tokens(wordpiece):
    vocab = vocab_info(wordpiece)
    ids, attention = random_blocks(wordpiece, n_rows=256)  # ~4,000 chosen tokens
    inputs, labels = mask_tokens(ids, attention, vocab, 0.15, False,
                                 torch.Generator().manual_seed(0))
    special = vocab.special[ids] | (attention == 0)
    chosen = labels != -100
    assert not (chosen & special).any(), "special tokens and padding are never masked"
    assert torch.equal(labels[chosen], ids[chosen])
    rate = chosen.sum() / (~special).sum()
    assert 0.14 < rate < 0.16
    masked = (inputs == wordpiece.mask_token_id) & chosen
    kept = (inputs == ids) & chosen
    randomised = chosen & ~masked & ~kept
    n = chosen.sum()
    assert 0.77 < masked.sum() / n < 0.83
    assert 0.075 < kept.sum() / n < 0.13  # a random token equal to the original counts as kept
    assert 0.07 < randomised.sum() / n < 0.125
    assert not vocab.special[inputs[randomised]].any(), "random replacements are real tokens"
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_whole_word_masking_takes_every_piece_of_a_word(wordpiece):
    vocab = vocab_info(wordpiece)
    ids, attention = random_blocks(wordpiece, seed=1)
    assert (~vocab.word_start[ids]).sum() > 100, "the fixture must have multi-piece words"
    _, labels = mask_tokens(ids, attention, vocab, 0.15, True, torch.Generator().manual_seed(0))
    chosen = labels != -100
    for row in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if not vocab.word_start[ids[row, t]] and not vocab.special[ids[row, t - 1]]:
                assert chosen[row, t] == chosen[row, t - 1], (row, t)  # same word, same fate
    rate = chosen.sum() / (~vocab.special[ids] & (attention == 1)).sum()
    assert 0.11 < rate < 0.19


def test_every_row_predicts_something_even_when_short(wordpiece):
    vocab = vocab_info(wordpiece)
    ids = torch.tensor([[wordpiece.cls_token_id, 20, 21, wordpiece.sep_token_id]] * 50)
    _, labels = mask_tokens(ids, torch.ones_like(ids), vocab, 0.01, False,
                            torch.Generator().manual_seed(0))
    assert ((labels != -100).sum(1) >= 1).all()
    assert (labels[:, [0, 3]] == -100).all()


def test_masks_depend_only_on_seed_and_batch_indices(wordpiece):
    tokens = np.asarray(random_blocks(wordpiece)[0][:-1].flatten(), dtype=np.uint16)
    data = Encoded(TokenBlocks(tokens, 32, {}), vocab_info(wordpiece))
    task = mlm_task("train.seed=1")
    a = task.collate(data, [3, 7, 9], wordpiece.pad_token_id)
    b = task.collate(data, [3, 7, 9], wordpiece.pad_token_id)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    other_seed = mlm_task("train.seed=2").collate(data, [3, 7, 9], wordpiece.pad_token_id)
    assert not torch.equal(a["labels"], other_seed["labels"])
    other_batch = task.collate(data, [3, 7, 10], wordpiece.pad_token_id)
    assert not torch.equal(a["labels"][:2], other_batch["labels"][:2])


def test_word_starts_for_each_tokenizer_family():
    bpe = tiny.train_tokenizer("roberta", sentences(100), 400, 64)
    vocab = vocab_info(bpe)
    ids = bpe("the cat playground")["input_ids"]
    tokens = bpe.convert_ids_to_tokens(ids)
    for token, start in zip(tokens, vocab.word_start[ids].tolist()):
        assert start == (token.startswith("\u0120") or token in bpe.all_special_tokens), token
    char = tiny.train_tokenizer("char", ["质量很好 iphone 很好"] * 3, 300, 64)
    ids = char("质量 iphone")["input_ids"]
    starts = vocab_info(char).word_start[ids].tolist()
    assert char.convert_ids_to_tokens(ids) == ["[CLS]", "质", "量", "i", "##p", "##h", "##o",
                                               "##n", "##e", "[SEP]"]
    assert starts == [True, True, True, True, False, False, False, False, False, True]


# --------------------------------------------------------------------------------------------
# causal LM, loss, metrics


def test_causal_labels_are_shifted_and_padding_is_ignored():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = shift_labels(ids, attention)
    assert labels.tolist() == [[6, 7, 8, -100], [10, -100, -100, -100]]
    task = get_task(resolve_config(overrides=["task.name=causal_lm", "data.train=x.txt"]))
    assert task.count_items({"labels": labels}) == 4
    assert task.peft_task_type == "CAUSAL_LM" and mlm_task().peft_task_type is None


def test_loss_sum_and_streaming_metrics():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, -100, 4, -100], [1, -100, -100, -100, 2]])
    task = mlm_task()
    loss, items = task.loss_sum(logits, {"labels": labels})
    keep = labels != -100
    assert items == 4
    assert loss.item() == pytest.approx(F.cross_entropy(logits[keep], labels[keep]).item() * 4)
    metrics = task.new_metrics([])
    metrics.update(logits[:1], {"labels": labels[:1]})
    other = LanguageModelMetrics()
    other.update(logits[1:], {"labels": labels[1:]})
    metrics.load_state(metrics.state() + other.state())  # what two processes do
    m = metrics.compute()
    assert m["n"] == 4 and m["loss"] == pytest.approx(loss.item() / 4)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert m["accuracy"] == (logits[keep].argmax(-1) == labels[keep]).float().mean().item()
    assert task.metrics[0] == "loss" and {"loss", "perplexity"} <= task.lower_is_better


@pytest.mark.parametrize("architecture", ["bert", "roberta-prelayernorm"])
def test_training_logits_only_at_masked_positions_give_the_same_loss_and_gradients(
        architecture):
    from tunelab.pretrain import scratch_model

    tok = tiny.train_tokenizer("char", ["".join(chr(0x4e00 + i) for i in range(40))] * 3, 300,
                               64)
    model = scratch_model("mlm", "tiny", tok, 32, seed=0, architecture=architecture, dropout=0.0)
    torch.manual_seed(0)
    ids = torch.randint(5, len(tok), (3, 16))
    labels = torch.full_like(ids, -100)
    labels[torch.rand(ids.shape) < 0.3] = 7
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    task = mlm_task()
    fast = task.train_logits(model, batch)
    assert fast.shape == (int((labels != -100).sum()), len(tok))
    loss_fast, n_fast = task.loss_sum(fast, batch)
    loss_fast.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss_full, n_full = task.loss_sum(model(**task.model_inputs(batch)).logits, batch)
    loss_full.backward()
    assert n_fast == n_full and loss_fast.item() == pytest.approx(loss_full.item(), rel=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, atol=1e-5), name
    # a wrapped model runs whole: its hooks (PEFT, DDP) must see the forward pass
    assert _encoder_and_head(torch.nn.Sequential(model)) is None


# --------------------------------------------------------------------------------------------
# reading the corpus


def test_txt_jsonl_folder_and_comma_lists(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first doc\n\n  \nsecond doc\n", encoding="utf-8")
    (tmp_path / "d" / "b.jsonl").write_text('{"body": "third"}\n{"body": null}\n'
                                            '{"body": "fourth"}\n', encoding="utf-8")
    (tmp_path / "d" / ".hidden.txt").write_text("never read\n")
    (tmp_path / "d" / "notes.md").write_text("not a corpus file\n")
    (tmp_path / "p.txt").write_text("para one\nstill one\n\n\npara two\n", encoding="utf-8")
    files = expand_paths(f"{tmp_path / 'd'}, {tmp_path / 'p.txt'}")
    assert [Path(f).name for f in files] == ["a.txt", "b.jsonl", "p.txt"]
    src = Source(files, text_column="body")
    docs = list(src.documents())
    assert [d.text for d in docs] == ["first doc", "second doc", "third", "fourth", "para one",
                                      "still one", "para two"]
    assert src.stats["empty_documents"] == 5  # four blank lines (line mode) and a null
    assert (Path(docs[3].file).name, docs[3].line) == ("b.jsonl", 3)
    paragraphs = list(Source([str(tmp_path / "p.txt")], separator="blank_line").documents())
    assert [(d.text, d.line) for d in paragraphs] == [("para one\nstill one", 1), ("para two", 5)]


@pytest.mark.parametrize("name, content, message, line", [
    ("bad.txt", b"good line\nbad \xff\xfe line\n", "not valid UTF-8", 2),
    ("bad.jsonl", b'{"text": "ok"}\n{"sentence": "x"}\n', "no field 'text'", 2),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": 3}\n', "expected text, got int", 2),
    ("bad.jsonl", b'{"text": "ok"}\n{oops\n', "invalid JSON", 2),
    ("array.json", b'[{"text": "a"}]\n', "JSON array", None),
    ("x.csv", b"text\nhello\n", "cannot tell the format", None),
    ("empty.txt", b"", "file is empty", None),
])
def test_bad_inputs_name_file_and_line(tmp_path, name, content, message, line):
    path = tmp_path / name
    path.write_bytes(content)
    cfg = resolve_config(overrides=[f"data.train={path}"]).data
    with pytest.raises(DataError) as err:
        data = load_corpus(cfg, "line", "mlm", 32)
        list(data.splits["train"].documents())
    assert message in str(err.value) and str(path) in str(err.value)
    if line:
        assert err.value.line == line


def test_missing_paths_and_unusable_settings(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        expand_paths(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="folder holds no"):
        expand_paths(str(tmp_path))
    (tmp_path / "a.txt").write_text("x\n")
    cfg = resolve_config(overrides=[f"data.train={tmp_path / 'a.txt'}", "data.test_ratio=0.1"])
    with pytest.raises(ConfigError, match="test_ratio"):
        load_corpus(cfg.data, "line", "mlm", 32)
    with pytest.raises(ConfigError, match="cannot hold a text corpus"):
        list(Source([str(tmp_path / "a.txt")], format="csv").documents())


def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"doc {i}\n" for i in range(200)) + "\n\n")
    cfg = resolve_config(overrides=[f"data.train={path}", "data.validation_ratio=0.1"]).data
    data = load_corpus(cfg, "line", "mlm", 32)
    train = [d.text for d in data.splits["train"].documents()]
    held = [d.text for d in data.splits["validation"].documents()]
    assert held == [f"doc {i}" for i in range(9, 200, 10)]
    assert sorted(train + held) == sorted(f"doc {i}" for i in range(200))
    assert held == [d.text for d in load_corpus(cfg, "line", "mlm", 32)
                    .splits["validation"].documents()]
    limited = resolve_config(overrides=[f"data.train={path}", "data.max_train_rows=5"]).data
    assert len(list(load_corpus(limited, "line", "mlm", 32).splits["train"].documents())) == 5


# --------------------------------------------------------------------------------------------
# the token cache


def test_token_cache_packs_documents_and_is_reused(tmp_path, cache, wordpiece, monkeypatch):
    path = tmp_path / "c.txt"
    texts = sentences(300)
    path.write_text("\n".join(texts) + "\n")
    source = Source([str(path)])
    blocks = token_blocks(source, wordpiece, 32, "mlm", None, progress=False)
    expected = [t for x in wordpiece(texts)["input_ids"] for t in x]  # [CLS] doc [SEP] ...
    assert blocks.tokens.dtype == np.uint16 and isinstance(blocks.tokens, np.memmap)
    assert list(blocks.tokens) == expected
    assert blocks.lengths == [32] * (len(expected) // 32) + [len(expected) % 32]
    assert blocks[1].tolist() == expected[32:64]
    assert source.stats["documents"] == 300 and source.stats["tokens"] == len(expected)
    # a second run (another block size too) reads the cache: tokenising again would fail
    with monkeypatch.context() as patch:
        patch.setattr(corpus, "write_cache", lambda *a, **k: pytest.fail("cache not reused"))
        again = token_blocks(Source([str(path)]), wordpiece, 64, "mlm", None)
    assert again.stats["cache"] == blocks.stats["cache"] and len(again) == -(-len(expected) // 64)
    assert Path(blocks.stats["cache"]).parent.parent == cache
    # causal LM: the same documents each followed by the end-of-text token, another cache
    clm = token_blocks(Source([str(path)]), wordpiece, 32, "causal_lm", 7, progress=False)
    first = wordpiece(texts[0], add_special_tokens=False)["input_ids"]
    assert list(clm.tokens[:len(first) + 1]) == first + [7]
    # an edited file is a new cache entry
    path.write_text("\n".join(texts[:10]) + "\n")
    os.utime(path, ns=(1, 1))
    changed = token_blocks(Source([str(path)]), wordpiece, 32, "mlm", None, progress=False)
    assert changed.stats["documents"] == 10 and changed.stats["cache"] != blocks.stats["cache"]


def test_a_crash_while_tokenising_leaves_no_cache(tmp_path, cache, wordpiece, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_DOCUMENTS", 10)
    path = tmp_path / "c.jsonl"
    good = [json.dumps({"text": t}) for t in sentences(50)]
    path.write_text("\n".join(good + ['{"text": 5}']) + "\n")
    with pytest.raises(DataError, match=":51"):
        token_blocks(Source([str(path)]), wordpiece, 32, "mlm", None, progress=False)
    assert not any((cache / "corpus").iterdir()), "neither a cache nor a temp folder is left"
    path.write_text("\n".join(good) + "\n")
    blocks = token_blocks(Source([str(path)]), wordpiece, 32, "mlm", None, progress=False)
    assert blocks.stats["documents"] == 50
    assert [p.name for p in (cache / "corpus").iterdir()] == [Path(blocks.stats["cache"]).name]


def test_memory_stays_flat_as_the_corpus_grows(tmp_path, wordpiece, monkeypatch):
    """Python-side peak memory of building the cache for 1x and 8x the text."""
    monkeypatch.setattr(corpus, "CHUNK_DOCUMENTS", 100)
    texts = sentences(1000)
    peaks = []
    for copies in (1, 8):
        path = tmp_path / f"c{copies}.txt"
        path.write_text("\n".join(texts * copies) + "\n")
        tracemalloc.start()
        blocks = token_blocks(Source([str(path)]), wordpiece, 64, "mlm", None, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert blocks.stats["documents"] == 1000 * copies
    assert peaks[1] < 1.5 * peaks[0], peaks


# --------------------------------------------------------------------------------------------
# tokenizers trained on the corpus


def test_char_tokenizer_keeps_english_and_digits_readable():
    texts = ["这个手机质量很好，iPhone 8 贴膜 123 元", "质量很差 很差", "wifi 很好"] * 5
    tok = tiny.train_tokenizer("char", iter(texts), 300, 64)  # one pass over an iterator
    tokens = tok.tokenize("手机 wifi 812 元")
    assert tokens == ["手", "机", "w", "##i", "##f", "##i", "8", "##1", "##2", "元"]
    assert "[UNK]" not in tok.tokenize("phone 321")  # unseen words of seen characters
    assert "##手" not in tok.get_vocab(), "CJK characters never continue a word"
    capped = tiny.train_tokenizer("char", texts, 20, 64)
    assert len(capped) <= 20 and "[UNK]" in capped.tokenize("这个手机质量很好 iphone")
    assert capped.tokenize("很") == ["很"], "the most frequent characters are kept"


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama", "char"])
def test_trained_tokenizers_are_deterministic_and_sized(kind):
    texts = sentences(300)
    a = tiny.train_tokenizer(kind, iter(texts), 400, 64)
    b = tiny.train_tokenizer(kind, iter(texts), 400, 64)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) <= 400
    ids = a("unbelievably extraordinary playground")["input_ids"]
    assert a.unk_token_id not in ids


def test_scratch_tokenizer_is_cached_and_fits_the_objective(tmp_path, cache):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(sentences(100)) + "\n")
    cfg = resolve_config(overrides=["model.size=tiny", "model.tokenizer=wordpiece",
                                    "model.vocab_size=300"]).model
    mlm = scratch_tokenizer(cfg, "mlm", Source([str(path)]))
    assert mlm.mask_token == "[MASK]" and len(list((cache / "tokenizers").iterdir())) == 1
    again = scratch_tokenizer(cfg, "mlm", Source([str(path)]))
    assert corpus.tokenizer_hash(again) == corpus.tokenizer_hash(mlm)
    assert len(list((cache / "tokenizers").iterdir())) == 1
    clm = scratch_tokenizer(cfg, "causal_lm", Source([str(path)]))
    assert clm.eos_token == "[SEP]" and clm.pad_token == "[PAD]"
    bpe = scratch_tokenizer(resolve_config(overrides=["model.size=tiny"]).model, "causal_lm",
                            Source([str(path)]))
    assert bpe.eos_token == "<|im_end|>" and bpe.chat_template


# --------------------------------------------------------------------------------------------
# config


def test_pretrain_config_rules(tmp_path):
    config = pretrain_config(None, ["data.train=c.txt", "task.whole_word_mask=true"])
    assert config.task.name == "mlm" and config.task.settings.whole_word_mask
    assert config.train.lr is None, "continued pretraining keeps the method's rate"
    scratch = pretrain_config(None, ["data.train=c.txt", "task=causal_lm", "model.size=mini"])
    assert scratch.task.name == "causal_lm" and scratch.train.lr == 5e-4
    assert pretrain_config(None, ["data.train=c.txt", "model.size=tiny",
                                  "train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ConfigError, match="needs a corpus"):
        pretrain_config(None, ["model.size=tiny"])
    with pytest.raises(ConfigError, match="use `tunelab train`"):
        pretrain_config(None, ["data.train=c.txt", "task=classification"])
    with pytest.raises(ConfigError, match="model.size must be one of tiny, mini, small"):
        resolve_config(overrides=["model.size=huge"])
    with pytest.raises(ConfigError, match="model.tokenizer applies only with model.size"):
        resolve_config(overrides=["model.tokenizer=char"])
    with pytest.raises(ConfigError, match="document_separator"):
        resolve_config(overrides=["task.name=mlm", "task.document_separator=page"])
    with pytest.raises(ConfigError, match="mlm_probability"):
        resolve_config(overrides=["task.name=mlm", "task.mlm_probability=1.5"])
