"""Readers and writers for csv, tsv, json, jsonl, parquet and 'LABEL text' files."""
import json

import pytest

from tunelab.data.readers import FORMATS, Row, detect_format, read_rows, write_rows
from tunelab.errors import DataError


def write(path, data):
    """Write bytes or text (UTF-8, newlines as given) and return the path."""
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def rows_of(path, format="auto"):
    return [(row.values, row.line) for row in read_rows(path, format)]


# --------------------------------------------------------------------------------------------
# formats


def test_detect_format_from_extension():
    assert detect_format("a/b.csv") == "csv"
    assert detect_format("b.TSV") == "tsv"
    assert detect_format("b.json") == "json"
    assert detect_format("b.jsonl") == detect_format("b.ndjson") == "jsonl"
    assert detect_format("b.parquet") == "parquet"
    assert detect_format("b.txt") == "labeltext"


def test_unknown_extension_lists_supported(tmp_path):
    with pytest.raises(DataError) as err:
        detect_format("data/train.xlsx")
    message = str(err.value)
    assert message.startswith("data/train.xlsx:")
    for ext in (".csv", ".tsv", ".jsonl", ".parquet", ".txt"):
        assert ext in message


def test_csv_rows_and_line_numbers(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\ngood,pos\n\nbad,neg\n")
    assert rows_of(path) == [({"text": "good", "label": "pos"}, 2),
                             ({"text": "bad", "label": "neg"}, 4)]


def test_csv_quoted_multiline_field_keeps_start_line(tmp_path):
    path = write(tmp_path / "d.csv",
                 'text,label\n"one\ntwo, ""three""",pos\nnext,neg\r\n"a\r\nb",x\n')
    assert rows_of(path) == [({"text": 'one\ntwo, "three"', "label": "pos"}, 2),
                             ({"text": "next", "label": "neg"}, 4),
                             ({"text": "a\r\nb", "label": "x"}, 5)]


def test_csv_short_row_gets_none_and_long_row_keeps_extra(tmp_path):
    path = write(tmp_path / "d.csv", "text,label,id\nonly text\na,b,c,d\n")
    rows = list(read_rows(path))
    assert rows[0].values == {"text": "only text", "label": None, "id": None}
    assert rows[1].values == {"text": "a", "label": "b", "id": "c"}
    assert rows[1].extra == ["d"]


def test_csv_utf8_bom_is_dropped(tmp_path):
    path = write(tmp_path / "d.csv", b"\xef\xbb\xbftext,label\nh\xc3\xa9,1\n")
    assert rows_of(path) == [({"text": "hé", "label": "1"}, 2)]


def test_csv_bad_bytes_flag_only_their_row(tmp_path):
    path = write(tmp_path / "d.csv",
                 b'text,label\ngood,1\nbad \xff byte,0\n"multi\nline \xfe",1\nok,0\n')
    rows = list(read_rows(path))
    assert [(r.line, r.bad_encoding) for r in rows] == [(2, False), (3, True), (4, True),
                                                        (6, False)]
    assert "\ufffd" in rows[1].values["text"]


def test_csv_duplicate_header_is_an_error(tmp_path):
    path = write(tmp_path / "d.csv", "text,text\na,b\n")
    with pytest.raises(DataError, match=r"d\.csv:1: header names column 'text' twice"):
        list(read_rows(path))


def test_utf16_file_is_refused(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\na,1\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        list(read_rows(path))


def test_tsv_keeps_quotes_literally(tmp_path):
    path = write(tmp_path / "d.tsv", 'sentence\tlabel\n"quoted" start\t1\nplain\t0\n')
    assert rows_of(path) == [({"sentence": '"quoted" start', "label": "1"}, 2),
                             ({"sentence": "plain", "label": "0"}, 3)]


def test_labeltext(tmp_path):
    path = write(tmp_path / "d.txt", "1 a great film\n\n0 dull , dull\n__label__pos fine\n7\n")
    assert rows_of(path) == [({"label": "1", "text": "a great film"}, 1),
                             ({"label": "0", "text": "dull , dull"}, 3),
                             ({"label": "pos", "text": "fine"}, 4),
                             ({"label": "7", "text": ""}, 5)]


def test_jsonl_rows_skip_blank_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
    assert rows_of(path) == [({"text": "a", "label": 1}, 1), ({"text": "b", "label": 0}, 3)]


def test_jsonl_invalid_line_names_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        list(read_rows(path))


def test_jsonl_non_object_line_names_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: expected a JSON object"):
        list(read_rows(path))


def test_jsonl_bad_bytes_flagged(tmp_path):
    path = write(tmp_path / "d.jsonl", b'{"text": "a"}\n{"text": "b\xff"}\n')
    assert [r.bad_encoding for r in read_rows(path)] == [False, True]


def test_json_list_and_wrapped_list(tmp_path):
    records = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    plain = write(tmp_path / "a.json", json.dumps(records))
    wrapped = write(tmp_path / "b.json", json.dumps({"version": 1, "data": records}))
    expected = [(records[0], 1), (records[1], 2)]
    assert rows_of(plain) == rows_of(wrapped) == expected


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = write(tmp_path / "d.json", '{"text": "a"}\n{"text": "b"}\n')
    assert rows_of(path) == [({"text": "a"}, 1), ({"text": "b"}, 2)]


def test_invalid_json_names_line(tmp_path):
    path = write(tmp_path / "d.json", '[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"d\.json:3: invalid JSON"):
        list(read_rows(path))


def test_json_with_two_lists_is_an_error(tmp_path):
    path = write(tmp_path / "d.json", json.dumps({"a": [], "b": []}))
    with pytest.raises(DataError, match="list-valued keys found: a, b"):
        list(read_rows(path))


def test_parquet_rows(tmp_path):
    write_rows(tmp_path / "d.parquet", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    assert rows_of(tmp_path / "d.parquet") == [({"text": "a", "label": 1}, 1),
                                              ({"text": "b", "label": 0}, 2)]


def test_unreadable_parquet_is_a_data_error(tmp_path):
    path = write(tmp_path / "d.parquet", b"not parquet at all")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable parquet file"):
        list(read_rows(path))


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.json", "d.jsonl", "d.parquet", "d.txt"])
def test_empty_file_is_an_error(tmp_path, name):
    path = write(tmp_path / name, b"")
    with pytest.raises(DataError, match="file is empty"):
        list(read_rows(path))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_rows(tmp_path / "nope.csv")


def test_format_override(tmp_path):
    path = write(tmp_path / "data.dat", "1 good\n")
    assert rows_of(path, "labeltext") == [({"label": "1", "text": "good"}, 1)]
    with pytest.raises(DataError, match="unknown format"):
        read_rows(path, "xml")


def test_read_rows_streams(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\nnot json\n')
    rows = read_rows(path)
    assert next(rows).values == {"text": "a"}  # the bad second line is not read yet


# --------------------------------------------------------------------------------------------
# writing


ROWS = [{"text": 'with "quote", comma', "label": "pos", "score": 0.5},
        {"label": "neg", "text": "second", "score": 1.25}]


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "labeltext"])
def test_write_rows_round_trip(tmp_path, fmt):
    path = tmp_path / f"out.{fmt}"
    write_rows(path, ROWS)
    rows = list(read_rows(path))
    expected_lines = [1, 2] if fmt in ("json", "jsonl", "parquet") else [2, 3]
    assert [r.line for r in rows] == expected_lines
    if fmt in ("csv", "tsv"):
        assert list(rows[0].values) == ["text", "label", "score"]  # column order kept
        assert rows[0].values == {"text": ROWS[0]["text"], "label": "pos", "score": "0.5"}
        assert rows[1].values == {"text": "second", "label": "neg", "score": "1.25"}
    else:
        assert [r.values for r in rows] == ROWS
    if fmt == "parquet":
        assert list(rows[1].values) == ["text", "label", "score"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_csv_multiline_round_trip(tmp_path):
    write_rows(tmp_path / "o.csv", [{"text": "a\nb", "label": "x"}, {"text": "c", "label": None}])
    assert rows_of(tmp_path / "o.csv") == [({"text": "a\nb", "label": "x"}, 2),
                                          ({"text": "c", "label": ""}, 4)]


def test_write_tsv_refuses_tabs(tmp_path):
    with pytest.raises(DataError, match=r"o\.tsv:3 column 'text': value holds a tab"):
        write_rows(tmp_path / "o.tsv", [{"text": "a"}, {"text": "b\tc"}])


def test_write_labeltext_is_refused(tmp_path):
    with pytest.raises(DataError, match="cannot write"):
        write_rows(tmp_path / "o.txt", ROWS)


def test_row_defaults():
    row = Row({"a": 1}, 3)
    assert row.bad_encoding is False and row.extra == []
