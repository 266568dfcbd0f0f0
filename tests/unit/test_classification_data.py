"""Classification data: columns, labels, problems, splits, the demo set and the preflight."""
import json
from collections import Counter

import pytest

from tunelab.config import DataConfig
from tunelab.data.classification import (Example, format_preflight, load_classification_data,
                                         normalize_label, read_prediction_inputs,
                                         split_by_ratio, stratified_subsample)
from tunelab.data.readers import write_rows
from tunelab.errors import DataError


def make_csv(path, rows, header=("text", "label")):
    write_rows(path, [dict(zip(header, row)) for row in rows])
    return str(path)


def balanced(n, labels=("neg", "pos"), prefix="t"):
    return [(f"{prefix} {i}", labels[i % len(labels)]) for i in range(n)]


def test_names_as_labels_sorted(tmp_path):
    train = make_csv(tmp_path / "train.csv", [("a", "pos"), ("b", "neg"), ("c", "pos")])
    data = load_classification_data(DataConfig(train=train, validation_ratio=0))
    assert data.labels == ["neg", "pos"]
    assert [(e.text, e.label, e.source) for e in data.splits["train"]] == [
        ("a", 1, f"{train}:2"), ("b", 0, f"{train}:3"), ("c", 1, f"{train}:4")]
    assert list(data.splits) == ["train"]


def test_integer_labels_in_numeric_order(tmp_path):
    rows = [{"text": "a", "label": 10}, {"text": "b", "label": 2.0}, {"text": "c", "label": "9"}]
    path = tmp_path / "train.jsonl"
    write_rows(path, rows)
    data = load_classification_data(DataConfig(train=str(path), validation_ratio=0))
    assert data.labels == ["2", "9", "10"]
    assert [e.label for e in data.splits["train"]] == [2, 0, 1]


def test_normalize_label():
    assert normalize_label(1) == normalize_label(1.0) == normalize_label(" 1 ") == "1"
    assert normalize_label("1.0") == "1"
    assert normalize_label(None) is None and normalize_label("  ") is None
    assert normalize_label(float("nan")) is None
    assert normalize_label(" pos ") == "pos"


def test_cfg_labels_accept_names_and_integer_ids(tmp_path):
    train = make_csv(tmp_path / "t.csv", [("a", "0"), ("b", "positive"), ("c", "1"),
                                          ("d", "5"), ("e", "meh")])
    cfg = DataConfig(train=train, labels=["negative", "positive"], validation_ratio=0)
    data = load_classification_data(cfg)
    assert [(e.text, e.label) for e in data.splits["train"]] == [("a", 0), ("b", 1), ("c", 1)]
    assert [(p.line, p.column, p.reason) for p in data.problems] == [
        (5, "label", "unknown label '5'"), (6, "label", "unknown label 'meh'")]


def test_unknown_label_in_validation_is_reported_and_dropped(tmp_path):
    train = make_csv(tmp_path / "train.csv", balanced(6))
    val = make_csv(tmp_path / "val.csv", [("x", "pos"), ("y", "neutral"), ("z", "neg")])
    data = load_classification_data(DataConfig(train=train, validation=val))
    assert [e.text for e in data.splits["validation"]] == ["x", "z"]
    assert [(p.file, p.line, p.reason) for p in data.problems] == [
        (val, 3, "unknown label 'neutral'")]
    assert data.sources == {"train": train, "validation": val}


def test_row_problems_are_reported_with_file_line_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nok,pos\n,neg\n   ,pos\nno label,\nbad \xff,neg\nfine,neg\n"
                     b"short\ntoo,many,fields\n")
    data = load_classification_data(DataConfig(train=str(path), validation_ratio=0))
    assert [e.text for e in data.splits["train"]] == ["ok", "fine"]
    name = str(path)
    assert [(p.file, p.line, p.column, p.reason) for p in data.problems] == [
        (name, 3, "text", "empty text"),
        (name, 4, "text", "empty text"),
        (name, 5, "label", "missing label"),
        (name, 6, "text", "bad encoding"),
        (name, 8, "label", "missing label"),
        (name, 9, None, "wrong number of fields (3, header has 2)")]


def test_text_pair_problems(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_rows(path, [{"a": "p", "b": "h", "label": "yes"}, {"a": "p", "b": "", "label": "no"},
                      {"a": "p", "label": "no"}, {"a": "q", "b": "h2", "label": "no"}])
    cfg = DataConfig(train=str(path), text_column="a", text_pair_column="b", validation_ratio=0)
    data = load_classification_data(cfg)
    assert [(e.text, e.text_pair) for e in data.splits["train"]] == [("p", "h"), ("q", "h2")]
    assert [p.reason for p in data.problems] == ["empty text pair", "missing text pair"]


def test_missing_column_error_lists_columns(tmp_path):
    train = make_csv(tmp_path / "t.csv", [("a", "x")], header=("sentence", "label"))
    with pytest.raises(DataError) as err:
        load_classification_data(DataConfig(train=train))
    assert str(err.value) == (f"file {train} has no column 'text'; its columns are: "
                              f"sentence, label. Set data.text_column=<column name>")


def test_missing_label_column_error(tmp_path):
    path = tmp_path / "t.jsonl"
    write_rows(path, [{"text": "a", "y": 1}])
    with pytest.raises(DataError, match=r"no column 'label'; its columns are: text, y\. "
                                        r"Set data\.label_column="):
        load_classification_data(DataConfig(train=str(path)))


def test_headerless_csv_hint(tmp_path):
    train = tmp_path / "t.csv"
    train.write_text("1,good film\n0,bad film\n")
    with pytest.raises(DataError, match="csv/tsv files need a header row"):
        load_classification_data(DataConfig(train=str(train)))


def test_labeltext_file_uses_configured_column_names(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("1 good\n0 bad\n1 fine\n")
    cfg = DataConfig(train=str(path), text_column="sentence", validation_ratio=0)
    data = load_classification_data(cfg)
    assert data.labels == ["0", "1"] and len(data.splits["train"]) == 3


def test_ratio_split_is_deterministic_stratified_and_disjoint(tmp_path):
    rows = balanced(90, labels=("a", "b", "c"))
    train = make_csv(tmp_path / "t.csv", rows)
    cfg = DataConfig(train=train, validation_ratio=0.2, test_ratio=0.1, split_seed=7)
    first = load_classification_data(cfg)
    second = load_classification_data(cfg)
    texts = {name: [e.text for e in split] for name, split in first.splits.items()}
    assert texts == {name: [e.text for e in split] for name, split in second.splits.items()}
    assert [len(texts[s]) for s in ("train", "validation", "test")] == [63, 18, 9]
    everything = texts["train"] + texts["validation"] + texts["test"]
    assert len(set(everything)) == 90
    for name in ("validation", "test"):
        assert set(Counter(e.label for e in first.splits[name]).values()) == {len(texts[name]) // 3}
    assert first.sources["validation"] == f"20% of {train} (seed 7)"
    assert first.sources["train"] == f"70% of {train} (seed 7)"
    other = load_classification_data(DataConfig(train=train, validation_ratio=0.2, split_seed=8))
    assert [e.text for e in other.splits["validation"]] != texts["validation"]


def test_ratio_split_covers_small_classes():
    examples = [Example(f"t{i}", 0) for i in range(40)] + [Example(f"r{i}", 1) for i in range(3)]
    parts = split_by_ratio(examples, {"validation": 0.1}, seed=0)
    assert {e.label for e in parts["validation"]} == {0, 1}
    assert {e.label for e in parts["train"]} == {0, 1}
    assert len(parts["validation"]) == 4


def test_max_train_rows_is_a_stratified_sample(tmp_path):
    rows = [(f"a{i}", "a") for i in range(60)] + [(f"b{i}", "b") for i in range(40)]
    train = make_csv(tmp_path / "t.csv", rows)
    cfg = DataConfig(train=train, validation_ratio=0, max_train_rows=10)
    data = load_classification_data(cfg)
    assert Counter(e.label for e in data.splits["train"]) == {0: 6, 1: 4}
    assert [e.text for e in data.splits["train"]] == [
        e.text for e in load_classification_data(cfg).splits["train"]]
    assert data.sources["train"] == f"{train}; 10 of its 100 rows (stratified sample, seed 42)"


def test_stratified_subsample_keeps_file_order():
    examples = [Example(f"t{i}", i % 3) for i in range(30)]
    sample = stratified_subsample(examples, 9, seed=1)
    assert len(sample) == 9 and Counter(e.label for e in sample) == {0: 3, 1: 3, 2: 3}
    assert sample == sorted(sample, key=lambda e: int(e.text[1:]))


def test_demo_set_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo must not depend on the current directory
    data = load_classification_data(DataConfig())
    assert data.labels == ["negative", "positive"]
    assert {name: len(split) for name, split in data.splits.items()} == {
        "train": 4000, "validation": 500, "test": 1821}
    assert data.sources["train"] == "packaged demo: SST-2 sample (4000 rows)"
    assert data.problems == []
    for split in data.splits.values():
        assert {e.label for e in split} == {0, 1}


def test_demo_with_max_train_rows():
    data = load_classification_data(DataConfig(max_train_rows=100))
    assert len(data.splits["train"]) == 100


def test_train_required_with_validation(tmp_path):
    val = make_csv(tmp_path / "v.csv", balanced(4))
    with pytest.raises(DataError, match="data.train is required"):
        load_classification_data(DataConfig(validation=val))


def test_split_without_usable_rows_names_file_and_reasons(tmp_path):
    train = make_csv(tmp_path / "t.csv", balanced(6))
    val = make_csv(tmp_path / "v.csv", [("a", "x"), ("", "neg"), ("b", "y")])
    with pytest.raises(DataError) as err:
        load_classification_data(DataConfig(train=train, validation=val))
    message = str(err.value)
    assert message.startswith(f"{val}: no usable rows (3 dropped: 2 unknown label, 1 empty text")


def test_single_class_training_data_is_refused(tmp_path):
    train = make_csv(tmp_path / "t.csv", [("a", "pos"), ("b", "pos")])
    with pytest.raises(DataError, match=r"1 class \('pos'\); classification needs at least 2"):
        load_classification_data(DataConfig(train=train, validation_ratio=0))


def test_header_only_file_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match="t.csv: file has no data rows"):
        load_classification_data(DataConfig(train=str(path)))


def test_preflight_counts(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"text,label\n" + b"".join(f"t{i},{'ab'[i % 2]}\n".encode() for i in range(20))
                     + b",a\nbad \xff,b\nx,c\n")
    data = load_classification_data(DataConfig(train=str(path), labels=["a", "b"],
                                               validation_ratio=0.2))
    report = data.preflight()
    json.dumps(report)  # JSON-able
    assert report["labels"] == ["a", "b"]
    assert report["splits"]["train"] == {"rows": 16, "per_class": {"a": 8, "b": 8},
                                         "source": f"80% of {path} (seed 42)"}
    assert report["splits"]["validation"]["per_class"] == {"a": 2, "b": 2}
    assert report["dropped"] == {"empty text": 1, "bad encoding": 1, "unknown label": 1}
    assert report["problems_total"] == 3
    assert report["problems"][1] == {"file": str(path), "line": 23, "column": "text",
                                     "reason": "bad encoding"}


def test_format_preflight_mentions_file_and_line(tmp_path):
    rows = balanced(10) + [("", "neg")] * 3 + [("z", "other")]
    train = make_csv(tmp_path / "t.csv", rows)
    data = load_classification_data(DataConfig(train=train, labels=["neg", "pos"]))
    text = format_preflight(data, max_problems=2)
    assert "neg" in text and "validation" in text and "total" in text
    assert f"{train}:12 column 'text': empty text" in text
    assert f"{train}:14 column 'text'" not in text  # over max_problems
    assert "... and 1 more" in text
    assert f"{train}:15 column 'label': unknown label 'other'" in text


def test_prediction_inputs_keep_rows_and_need_no_label(tmp_path):
    path = tmp_path / "in.csv"
    write_rows(path, [{"id": "1", "text": "good"}, {"id": "2", "text": "bad"}])
    rows, examples = read_prediction_inputs(str(path), DataConfig())
    assert [r.values for r in rows] == [{"id": "1", "text": "good"}, {"id": "2", "text": "bad"}]
    assert [(e.text, e.label, e.source) for e in examples] == [
        ("good", -1, f"{path}:2"), ("bad", -1, f"{path}:3")]


def test_prediction_inputs_refuse_empty_text(tmp_path):
    path = tmp_path / "in.jsonl"
    write_rows(path, [{"text": "good"}, {"text": " "}])
    with pytest.raises(DataError, match=r"in\.jsonl:2 column 'text': empty text"):
        read_prediction_inputs(path, DataConfig())


def test_prediction_inputs_missing_column(tmp_path):
    path = tmp_path / "in.csv"
    write_rows(path, [{"review": "good"}])
    with pytest.raises(DataError, match="has no column 'text'; its columns are: review"):
        read_prediction_inputs(path, DataConfig())
