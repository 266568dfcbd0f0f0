"""Token classification: reading tagged files, schemes, sub-word alignment, streaming entity
metrics (checked against seqeval) and word splitting for raw text."""
import json
import random

import pytest
import torch

from tunelab.config import DataConfig, resolve_config
from tunelab.data.tag_schemes import detect_scheme, to_scheme
from tunelab.data.tagging import (Sentence, format_preflight, load_labeled_tagging_file,
                                  load_tagging_data)
from tunelab.errors import ConfigError, DataError
from tunelab.predict_tagging import split_words
from tunelab.tasks.token_classification import (TaggingMetrics, TokenClassificationSettings,
                                                collate, encode_sentences)

CONLL = """-DOCSTART- -X- O O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- O O

BRUSSELS NNP B-NP B-LOC
"""


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(train, settings=None, **data):
    return load_tagging_data(DataConfig(train=train, validation_ratio=0, **data),
                             settings or TokenClassificationSettings())


def test_conll_tag_column_is_the_last_that_looks_like_tags(tmp_path):
    # the chunk column (B-NP ...) looks like tags too; NER is the last such column
    data = load(write(tmp_path / "train.txt", CONLL))
    sentences = data.splits["train"]
    assert [s.words for s in sentences] == [["EU", "rejects", "German", "call"],
                                            ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert [s.tags for s in sentences][1] == ["B-PER", "I-PER"]
    assert [s.source for s in sentences] == [f"{tmp_path}/train.txt:3", f"{tmp_path}/train.txt:8",
                                             f"{tmp_path}/train.txt:13"]
    assert data.labels == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC",
                           "I-ORG", "I-PER"]
    assert "tags: column 3, auto-detected" in data.sources["train"]


def test_conll_token_tag_zero_layout_and_column_override(tmp_path):
    train = write(tmp_path / "train.conll", "John B-PER 0\nlives O 0\n\nRome B-LOC 0\n")
    assert load(train).splits["train"][0].tags == ["B-PER", "O"]
    chunks = load(write(tmp_path / "c.txt", CONLL), TokenClassificationSettings(tag_column=2))
    assert chunks.splits["train"][0].tags == ["B-NP", "B-VP", "B-NP", "I-NP"]
    with pytest.raises(ConfigError, match="tag_column must be at least 1"):
        TokenClassificationSettings(tag_column=0)


def test_conll_without_tag_column_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"no column of tags found .*task.tag_column"):
        load(write(tmp_path / "train.txt", "John NNP 1\nlives VBZ 2\n"))


def test_bad_lines_are_dropped_with_file_and_line(tmp_path):
    text = ("John B-PER\nlives O\n\n"          # ok
            "Mary B-PRE\nsings 0-X\n\n"         # line 5: not a tag
            "Anna\nruns O\n\n"                  # line 7: no tag column
            "Paul B-PER\nwalks O\n")
    train = write(tmp_path / "train.txt", text)
    data = load(train)
    assert [s.words[0] for s in data.splits["train"]] == ["John", "Paul"]
    where = {(p.line, p.kind()) for p in data.problems}
    assert where == {(5, "not a tag"), (7, "missing tag")}
    report = format_preflight(data)
    assert f"{train}:5: not a tag '0-X'" in report and "Dropped 2 sentences" in report
    assert data.preflight()["dropped"] == {"not a tag": 1, "missing tag": 1}


def test_jsonl_rows_string_and_integer_tags(tmp_path):
    rows = [{"tokens": ["John", "Smith", "sings"], "tags": ["B-PER", "I-PER", "O"]},
            {"tokens": "in Rome", "tags": "O B-LOC"},
            {"tokens": ["a", "b"], "tags": ["O"]}]
    train = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    data = load(train)
    assert [s.tags for s in data.splits["train"]] == [["B-PER", "I-PER", "O"], ["O", "B-LOC"]]
    [problem] = data.problems
    assert (problem.line, problem.column) == (3, "tags")
    assert problem.reason == "tokens and tags differ in length (2 tokens, 1 tags)"

    ids = write(tmp_path / "ids.jsonl", json.dumps({"words": ["Bob", "ran"], "ner": [1, 0]}))
    settings = TokenClassificationSettings(tokens_field="words", tags_field="ner")
    with pytest.raises(DataError, match=r"ids.jsonl:1 column 'ner': tags are integer ids"):
        load(ids, settings)
    data = load(ids, settings, labels=["O", "B-PER", "I-PER"])
    assert data.splits["train"][0].tags == ["B-PER", "O"]
    assert data.labels == ["O", "B-PER", "I-PER"]  # data.labels keep their order (ids)
    with pytest.raises(DataError, match=r"no row has a field 'tokens'; the fields are: words"):
        load(ids, labels=["O", "B-PER"])


@pytest.mark.parametrize("scheme,tags,expected", [
    ("IOB2", ["B-PER", "I-PER", "O"], ["B-PER", "I-PER", "O"]),
    ("IOB1", ["I-PER", "I-PER", "B-PER", "O", "I-LOC"], ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]),
    ("BIOES", ["B-PER", "E-PER", "S-LOC", "O"], ["B-PER", "E-PER", "S-LOC", "O"]),
    ("BIOES", ["B-PER", "L-PER", "U-LOC"], ["B-PER", "E-PER", "S-LOC"]),  # BILOU
])
def test_schemes_convert(scheme, tags, expected):
    assert to_scheme(tags, scheme) == (expected, None)


@pytest.mark.parametrize("scheme,tags,position,reason", [
    ("IOB2", ["O", "I-PER"], 1, "invalid sequence 'O I-PER'"),
    ("IOB2", ["B-LOC", "I-PER"], 1, "invalid sequence 'B-LOC I-PER'"),
    ("IOB2", ["S-PER"], 0, "tag not of the scheme 'S-PER'"),
    ("BIOES", ["B-PER", "O"], 0, "invalid sequence 'B-PER O'"),
    ("BIOES", ["B-PER"], 0, "invalid sequence 'B-PER (sentence end)'"),
    ("BIOES", ["O", "E-PER"], 1, "invalid sequence 'O E-PER'"),
    ("IOB1", ["X-PER"], 0, "not a tag 'X-PER'"),
])
def test_schemes_reject(scheme, tags, position, reason):
    converted, error = to_scheme(tags, scheme)
    assert error[0] == position and error[1].startswith(reason), error


def test_scheme_detection():
    assert detect_scheme([["B-PER", "I-PER"], ["O", "B-LOC"]]) == "IOB2"
    assert detect_scheme([["I-PER", "I-PER", "O", "I-LOC"], ["I-ORG", "B-ORG"]]) == "IOB1"
    assert detect_scheme([["S-PER", "O"]]) == "BIOES"
    assert detect_scheme([["U-PER"]]) == "BIOES"


def test_iob1_files_become_iob2_and_unknown_tags_in_validation_are_dropped(tmp_path):
    train = write(tmp_path / "train.txt", "John I-PER\nSmith I-PER\nin O\nRome I-LOC\n")
    valid = write(tmp_path / "valid.txt", "Ann I-PER\n\nACME I-ORG\nsells O\n")
    data = load(train, validation=valid)
    assert (data.scheme_read, data.scheme) == ("IOB1", "IOB2")
    assert data.splits["train"][0].tags == ["B-PER", "I-PER", "O", "B-LOC"]
    assert data.labels == ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]  # I-LOC although unseen
    assert [s.words for s in data.splits["validation"]] == [["Ann"]]
    [problem] = data.problems
    assert (problem.file, problem.line, problem.kind()) == (valid, 3, "unknown tag")
    assert "IOB1, converted to IOB2" in format_preflight(data)


def test_invalid_sequence_dropped_and_scheme_setting_checked(tmp_path):
    train = write(tmp_path / "train.txt", "John B-PER\nSmith I-PER\n\nin O\nRome I-LOC\n")
    data = load(train, TokenClassificationSettings(scheme="IOB2"))
    assert len(data.splits["train"]) == 1
    assert (data.problems[0].line, data.problems[0].kind()) == (5, "invalid sequence")
    with pytest.raises(ConfigError, match="task.scheme must be one of"):
        TokenClassificationSettings(scheme="BILOU")
    with pytest.raises(DataError, match="data.labels must include the outside tag O"):
        load(train, labels=["B-PER", "I-PER"])
    with pytest.raises(DataError, match="data.labels: tag not of the scheme 'E-PER'"):
        load(train, TokenClassificationSettings(scheme="IOB2"), labels=["O", "B-PER", "E-PER"])


def test_training_without_entities_is_refused(tmp_path):
    with pytest.raises(DataError, match="hold no entity"):
        load(write(tmp_path / "train.txt", "a O\nb O\n"))


def test_ratio_split_keeps_every_sentence_once(tmp_path):
    text = "".join(f"w{i} {'B-PER' if i % 3 else 'O'}\nx O\n\n" for i in range(30))
    data = load_tagging_data(DataConfig(train=write(tmp_path / "t.txt", text),
                                        validation_ratio=0.2),
                             TokenClassificationSettings())
    words = [s.words[0] for split in data.splits.values() for s in split]
    assert sorted(words) == sorted(f"w{i}" for i in range(30))
    assert len(data.splits["validation"]) == 6
    assert "20% of" in data.sources["validation"]


def test_eval_file_is_read_against_the_run_tags(tmp_path):
    labels = ["O", "B-PER", "I-PER"]
    path = write(tmp_path / "test.txt", "Bob B-PER\n\nRome B-LOC\n")
    sentences, problems = load_labeled_tagging_file(path, TokenClassificationSettings(), labels)
    assert [s.words for s in sentences] == [["Bob"]]
    assert problems[0].line == 3 and problems[0].reason.startswith("unknown tag 'B-LOC'")


# --------------------------------------------------------------------------------------------
# alignment


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from tunelab.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tok") / "bert", kind="bert", vocab_size=60,
                            texts=["john smith lives in new york", "johnny walked"] * 5)
    return AutoTokenizer.from_pretrained(path)


LABELS = ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]


def test_first_subtoken_carries_the_tag(tokenizer):
    sentence = Sentence(["Johnny", "lives", "in", "New", "York"],
                        ["B-PER", "O", "O", "B-LOC", "I-LOC"])
    enc = encode_sentences(tokenizer, [sentence], LABELS, max_length=64)
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids[0])
    assert len(tokens) > 7, tokens  # "johnny" and friends are split into sub-words
    firsts = [i for i, w in enumerate(enc.word_ids[0])
              if w >= 0 and (i == 0 or enc.word_ids[0][i - 1] != w)]
    assert [enc.labels[0][i] for i in firsts] == [2, 0, 0, 1, 3]
    others = [t for i, t in enumerate(enc.labels[0]) if i not in firsts]
    assert set(others) == {-100}
    assert enc.gold == [[2, 0, 0, 1, 3]] and enc.truncated == 0

    every = encode_sentences(tokenizer, [sentence], LABELS, 64, label_all_subwords=True)
    inner = [every.labels[0][i] for i, w in enumerate(every.word_ids[0])
             if w == 0 and i not in firsts]
    assert inner and set(inner) == {LABELS.index("I-PER")}

    from tunelab.tasks.token_classification import TokenClassificationTask

    task = TokenClassificationTask(resolve_config(overrides=["task=token_classification"]))
    shown = task.show_example(tokenizer, enc, 0)
    assert "[CLS]/-" in shown and f"{tokens[firsts[0]]}/B-PER" in shown


def test_truncation_counts_sentences_and_entities(tokenizer):
    words = ["lives"] * 10 + ["John", "Smith"]
    sentence = Sentence(words, ["O"] * 10 + ["B-PER", "I-PER"])
    enc = encode_sentences(tokenizer, [sentence], LABELS, max_length=12)
    assert len(enc.input_ids[0]) == 12
    assert (enc.truncated, enc.truncated_entities) == (1, 1)
    assert len(enc.gold[0]) == 12  # the gold keeps every word: metrics see what was cut


# --------------------------------------------------------------------------------------------
# metrics


def random_tags(rng, types, scheme, n):
    """A valid tag sequence of `scheme` with random entities."""
    tags = []
    while len(tags) < n:
        if rng.random() < 0.5:
            tags.append("O")
            continue
        kind, length = rng.choice(types), rng.randint(1, 3)
        if scheme == "IOB2":
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (length - 1)
        elif length == 1:
            tags.append(f"S-{kind}")
        else:
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (length - 2) + [f"E-{kind}"]
    return tags[:n] if scheme == "IOB2" else tags


def noisy(rng, tags, labels):
    """Predictions: mostly right, some tags replaced at random (invalid sequences included)."""
    return [rng.choice(labels) if rng.random() < 0.25 else t for t in tags]


@pytest.mark.parametrize("scheme", ["IOB2", "BIOES"])
def test_streaming_metrics_equal_seqeval(scheme):
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    from tunelab.data.tag_schemes import complete_tags

    rng = random.Random(7)
    types = ["LOC", "MISC", "ORG", "PER"]
    labels = complete_tags(types, scheme)
    gold = [random_tags(rng, ["LOC", "ORG", "PER"], scheme, rng.randint(1, 12))
            for _ in range(300)]
    pred = [noisy(rng, g, labels) for g in gold]  # MISC: predicted only, never gold
    first, second = TaggingMetrics(labels), TaggingMetrics(labels)
    for i, (g, p) in enumerate(zip(gold, pred)):
        (first if i % 2 else second).add(g, p)
    merged = TaggingMetrics(labels)
    merged.load_state(first.state() + second.state())  # what processes do with their shares
    m = merged.compute()
    assert m["f1"] == pytest.approx(f1_score(gold, pred), abs=1e-12)
    assert m["precision"] == pytest.approx(precision_score(gold, pred), abs=1e-12)
    assert m["recall"] == pytest.approx(recall_score(gold, pred), abs=1e-12)
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    for kind in types:
        if kind in report:
            ours = merged.per_type()[kind]
            assert ours["f1"] == pytest.approx(report[kind]["f1-score"], abs=1e-12)
            assert ours["support"] == report[kind]["support"]
    assert "MISC" in report and report["MISC"]["support"] == 0
    assert m["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"], abs=1e-12)
    words = sum(len(g) for g in gold)
    right = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
    assert m["token_accuracy"] == pytest.approx(right / words)
    assert m["entities"] == sum(report[k]["support"] for k in report if k in types)
    text = merged.report()
    assert "micro avg" in text and "macro avg" in text and "PER" in text


def test_metrics_from_logits_count_truncated_words_as_o(tokenizer):
    sentence = Sentence(["lives"] * 10 + ["John", "Smith"], ["O"] * 10 + ["B-PER", "I-PER"])
    enc = encode_sentences(tokenizer, [sentence], LABELS, max_length=12)
    batch = collate(enc, [0], tokenizer.pad_token_id)
    logits = torch.zeros(1, batch["input_ids"].shape[1], len(LABELS))
    for t, label in enumerate(batch["labels"][0].tolist()):
        logits[0, t, max(label, 0)] = 5.0  # a perfect model on what it sees
    metrics = TaggingMetrics(LABELS)
    metrics.update(logits, batch)
    m = metrics.compute()
    assert max(enc.word_ids[0]) + 1 <= 10  # the name was cut off ...
    assert (m["recall"], m["precision"], m["entities"]) == (0.0, 0.0, 1)  # ... and counts as O
    assert m["token_accuracy"] == pytest.approx(10 / 12)  # every O word right, the name wrong
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "word_ids",
                          "gold_tags"}
    assert batch["gold_tags"].shape == (1, 12)


# --------------------------------------------------------------------------------------------
# raw text


def test_split_words_offsets_and_cjk():
    text = "Mr. O'Neil lives in New-York, 2024!"
    words, offsets = split_words(text)
    assert words == ["Mr", ".", "O", "'", "Neil", "lives", "in", "New", "-", "York", ",",
                     "2024", "!"]
    assert all(text[a:b] == w for w, (a, b) in zip(words, offsets))
    words, offsets = split_words("张三在北京 works")
    assert words == ["张", "三", "在", "北", "京", "works"]
    assert offsets[-1] == (6, 11)
