"""Read and write tabular data files: csv, tsv, json, jsonl, parquet and 'LABEL text' lines.

Every reader yields `Row`s that remember the line they came from, so that later checks can
say "train.csv:17 column 'text': empty text". Text formats are decoded line by line: a row
holding bytes that are not UTF-8 is flagged (`bad_encoding`) instead of failing the file.

Format notes
- csv: header row required; quoted fields may span lines (the csv module's dialect).
- tsv: header row required; no quoting (the GLUE convention): a field is everything between
  two tabs, so quotes inside texts are kept as written. Fields cannot contain tabs or newlines.
- json: a list of objects, or an object with one list-valued key ({"data": [...]}). A .json
  file that holds one object per line (JSON lines) is read as jsonl.
- labeltext: `LABEL text` per line (a fastText `__label__` prefix is removed).
"""
from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import DataError
from tunelab.io import atomic_write_bytes, atomic_write_text

FORMATS = ("csv", "tsv", "json", "jsonl", "parquet", "labeltext")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl",
              ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "labeltext"}


@dataclass
class Row:
    """One record of a data file."""

    values: dict[str, Any]
    """Column -> value: str for csv/tsv/labeltext, JSON types for json/jsonl/parquet. In csv and
    tsv files a row with fewer fields than the header has None for the missing columns."""
    line: int
    """1-based line where the row starts (csv/tsv: physical line, the header is line 1;
    jsonl: line; json array: element index + 1; parquet: row index + 1)."""
    bad_encoding: bool = False
    """The row held bytes that are not valid UTF-8 (decoded with errors="replace")."""
    extra: list[str] = field(default_factory=list)
    """csv/tsv: fields beyond the header's columns (a sign of a misquoted row)."""


def detect_format(path: str | Path) -> str:
    """The format named by the file's extension; unknown extensions are a DataError."""
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        known = ", ".join(f"{ext} ({name})" for ext, name in EXTENSIONS.items())
        raise DataError(f"cannot tell the format from the extension; supported: {known}. "
                        f"Or set data.format", file=str(path))
    return fmt


def _resolve_format(path, format: str) -> str:
    if format == "auto":
        return detect_format(path)
    if format not in FORMATS:
        raise DataError(f"unknown format {format!r}; use one of auto, {', '.join(FORMATS)}",
                        file=str(path))
    return format


def read_rows(path: str | Path, format: str = "auto") -> Iterator[Row]:
    """Yield the rows of a data file. Streams csv, tsv, jsonl and labeltext files."""
    fmt = _resolve_format(path, format)
    check_readable(path)
    readers = {"csv": _read_csv, "tsv": _read_tsv, "json": _read_json, "jsonl": _read_jsonl,
               "parquet": _read_parquet, "labeltext": _read_labeltext}
    return readers[fmt](path)


def check_readable(path) -> None:
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", file=str(path))
    if p.is_dir():
        raise DataError("is a folder, not a data file", file=str(path))
    if p.stat().st_size == 0:
        raise DataError("file is empty", file=str(path))


# --------------------------------------------------------------------------------------------
# line-oriented text formats


def numbered_lines(path, bad_lines: list[int] | None = None) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, bad_encoding) per physical line, line endings kept.

    Decoding line by line is safe for UTF-8: the newline byte never occurs inside a
    multi-byte character. A UTF-8 BOM is dropped; UTF-16 files are refused.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                    raise DataError("file is UTF-16 encoded; save it as UTF-8", file=str(path))
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                yield number, raw.decode("utf-8"), False
            except UnicodeDecodeError:
                if bad_lines is not None:
                    bad_lines.append(number)
                yield number, raw.decode("utf-8", errors="replace"), True


def _read_labeltext(path) -> Iterator[Row]:
    for number, text, bad in numbered_lines(path):
        parts = text.strip().split(None, 1)
        if not parts:
            continue
        label = parts[0].removeprefix("__label__")
        yield Row({"label": label, "text": parts[1] if len(parts) > 1 else ""}, number, bad)


def _read_jsonl(path) -> Iterator[Row]:
    for number, text, bad in numbered_lines(path):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (character {e.colno})",
                            file=str(path), line=number) from None
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object per line, got {type(value).__name__}",
                            file=str(path), line=number)
        yield Row(value, number, bad)


def _read_tsv(path) -> Iterator[Row]:
    header = None
    for number, text, bad in numbered_lines(path):
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        fields = text.split("\t")
        if header is None:
            header = _check_header(fields, path, number)
            continue
        yield _make_row(header, fields, number, bad)
    if header is None:
        raise DataError("file has no header row (it holds only blank lines)", file=str(path))


def _read_csv(path) -> Iterator[Row]:
    bad_lines: list[int] = []
    reader = csv.reader(text for _, text, _ in numbered_lines(path, bad_lines))
    header, start = None, 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"not valid CSV: {e}{_csv_hint(e)}", file=str(path),
                            line=start) from None
        end = reader.line_num
        bad = any(start <= n <= end for n in bad_lines)
        bad_lines[:] = [n for n in bad_lines if n > end]
        if fields and any(f.strip() for f in fields):
            if header is None:
                header = _check_header(fields, path, start)
            else:
                yield _make_row(header, fields, start, bad)
        start = end + 1
    if header is None:
        raise DataError("file has no header row (it holds only blank lines)", file=str(path))


def _csv_hint(error: csv.Error) -> str:
    if "field larger than field limit" in str(error):
        return "; probably a quote (\") that is never closed starts at this line"
    return ""


def _check_header(fields: list[str], path, line: int) -> list[str]:
    names = [f.strip() for f in fields]
    seen = set()
    for name in names:
        if name in seen:
            raise DataError(f"header names column {name!r} twice; the first line must be a "
                            f"header of distinct column names", file=str(path), line=line)
        seen.add(name)
    return names


def _make_row(header: list[str], fields: list[str], line: int, bad: bool) -> Row:
    values: dict[str, Any] = dict(zip(header, fields))
    for name in header[len(fields):]:
        values[name] = None
    return Row(values, line, bad, extra=fields[len(header):])


# --------------------------------------------------------------------------------------------
# whole-file formats


def _read_json(path) -> Iterator[Row]:
    raw = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text, bad = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, bad = raw.decode("utf-8", errors="replace"), True
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_jsonl(path)  # a JSON lines file named .json
            return
        raise DataError(f"invalid JSON: {e.msg} (character {e.colno})",
                        file=str(path), line=e.lineno) from None
    for index, item in enumerate(_json_records(data, path)):
        if not isinstance(item, dict):
            raise DataError(f"element {index} of the list is {type(item).__name__}, "
                            f"expected an object", file=str(path), line=index + 1)
        # Only the whole file is known to be bad; flag the records that show the damage.
        yield Row(item, index + 1, bad and "\ufffd" in json.dumps(item, ensure_ascii=False))


def _json_records(data, path) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1:
            return data[lists[0]]
        found = ", ".join(lists) if lists else "none"
        raise DataError(f"expected a list of objects, or an object with exactly one list "
                        f"(like {{\"data\": [...]}}); list-valued keys found: {found}",
                        file=str(path))
    raise DataError(f"expected a list of objects, got {type(data).__name__}", file=str(path))


def _read_parquet(path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable parquet file: {e}", file=str(path)) from None
    index = 0
    try:
        for batch in table_file.iter_batches(batch_size=4096):
            for values in batch.to_pylist():
                index += 1
                yield Row(values, index)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"parquet file is damaged after row {index}: {e}",
                        file=str(path)) from None


# --------------------------------------------------------------------------------------------
# writing


def write_rows(path: str | Path, rows: list[dict], format: str = "auto") -> None:
    """Write rows atomically in csv, tsv, json, jsonl or parquet, keeping column order.

    Columns are the keys in order of first appearance; a row without a key gets an empty
    value (csv, tsv) or null (json, parquet); jsonl and json write each row as given.
    """
    fmt = _resolve_format(path, format)
    if fmt == "labeltext":
        raise DataError("cannot write 'LABEL text' files; use .csv, .tsv, .jsonl, .json or "
                        ".parquet", file=str(path))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())
    elif fmt == "tsv":
        atomic_write_text(path, _tsv_text(path, rows, columns))
    elif fmt == "jsonl":
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                        for row in rows))
    elif fmt == "json":
        atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    else:
        atomic_write_bytes(path, _parquet_bytes(rows, columns))


def _tsv_text(path, rows: list[dict], columns: list[str]) -> str:
    lines = ["\t".join(columns)]
    for number, row in enumerate(rows, start=2):
        cells = ["" if row.get(c) is None else str(row.get(c)) for c in columns]
        for column, cell in zip(columns, cells):
            if any(ch in cell for ch in "\t\n\r"):
                raise DataError("value holds a tab or line break, which tsv cannot store; "
                                "write .csv or .jsonl instead", file=str(path), line=number,
                                column=column)
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


def _parquet_bytes(rows: list[dict], columns: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [row.get(c) for row in rows] for c in columns})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
