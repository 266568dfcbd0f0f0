"""Unlabelled text for language modelling: documents streamed from files, a deterministic
held-out split, and a token cache on disk that training reads as fixed-size blocks.

Inputs (`data.train`, `data.validation`, `data.test`), each one of
- a .txt file: one document per line, or paragraphs separated by blank lines
  (`task.document_separator: blank_line`);
- a JSON Lines file (.jsonl, .ndjson, or .json holding one object per line) whose
  `data.text_column` field holds the text;
- a folder: every such file under it (sorted, hidden files skipped);
- several of the above separated by commas (`data.train: a.txt,more/,c.jsonl`).

Nothing holds the corpus in memory. Documents are generated one at a time, tokenised in
chunks with the fast tokenizer and appended to a flat token file (uint16 when the vocabulary
fits, else uint32). The file lives in ``models.cache_dir()/corpus/<key>``, where the key hashes
the files (paths, sizes, modification times), the reading settings, the tokenizer and the
objective; it is written in a temporary folder and renamed, so a crash never leaves a partial
cache, and later runs (`tunelab check` then `pretrain`, a resumed run, `eval`) reuse it.
Training reads it through np.memmap and cuts it into blocks of `model.max_length` tokens.

Held-out validation without a validation file: document i (counting non-empty documents from
0, in file order) is held out when floor((i + 1) * ratio) > floor(i * ratio): every 10th
document for a ratio of 0.1, spread evenly, the same on every run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tunelab.errors import ConfigError, DataError

EXTENSIONS = {".txt": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
SEPARATORS = ("line", "blank_line")
CACHE_VERSION = 1
CHUNK_DOCUMENTS = 1000
CHUNK_CHARS = 1 << 20
"""A tokenisation chunk ends at this many documents or characters, whichever comes first:
enough for the fast tokenizer's batching, small enough that memory stays flat."""


class Document(NamedTuple):
    text: str
    file: str
    line: int
    """1-based line where the document starts."""


@dataclass
class Source:
    """Where one split's documents come from, and which of them it takes."""

    files: list[str]
    format: str = "auto"
    """auto (from each file's extension), text or jsonl."""
    text_column: str = "text"
    separator: str = "line"
    holdout: float = 0.0
    """The validation ratio that splits these files (0 = no split)."""
    take: str = "all"
    """all, kept (the documents the ratio leaves for training) or held (those it holds out)."""
    max_documents: int | None = None
    stats: dict = field(default_factory=dict)
    """Counts filled in once the split is tokenised (documents, tokens, blocks ...)."""

    def fingerprint(self) -> dict:
        """What the documents depend on: the files as they are now and the reading settings."""
        files = []
        for f in self.files:
            st = os.stat(f)
            files.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
        return {"files": files, "format": self.format, "text_column": self.text_column,
                "separator": self.separator, "holdout": self.holdout, "take": self.take,
                "max_documents": self.max_documents}

    def describe(self) -> str:
        names = ", ".join(Path(f).name for f in self.files[:4])
        more = f" and {len(self.files) - 4} more" if len(self.files) > 4 else ""
        size = sum(os.path.getsize(f) for f in self.files) / 1e6
        rule = {"all": "every document",
                "kept": f"every document except the held-out {self.holdout:.0%}",
                "held": f"{self.holdout:.0%} of the documents, held out evenly"}[self.take]
        limit = f", at most {self.max_documents:,}" if self.max_documents else ""
        return f"{len(self.files)} file(s), {size:,.1f} MB ({names}{more}): {rule}{limit}"

    def documents(self) -> Iterator[Document]:
        """The non-empty documents this split takes, in file order. Counts the empty ones it
        drops in `self.stats['empty_documents']` as it goes."""
        self.stats["empty_documents"] = 0
        index = taken = 0
        for path in self.files:
            for doc in read_documents(path, self.format, self.text_column, self.separator):
                if not doc.text.strip():
                    self.stats["empty_documents"] += 1
                    continue
                held = self.take != "all" and held_out(index, self.holdout)
                index += 1
                if self.take == "all" or (self.take == "held") == held:
                    if self.max_documents is not None and taken >= self.max_documents:
                        return
                    taken += 1
                    yield doc

    def texts(self) -> Iterator[str]:
        return (doc.text for doc in self.documents())


def held_out(index: int, ratio: float) -> bool:
    return ratio > 0 and math.floor((index + 1) * ratio) > math.floor(index * ratio)


# --------------------------------------------------------------------------------------------
# files -> documents


def expand_paths(spec: str, what: str = "data.train") -> list[str]:
    """A comma-separated list of files and folders -> the corpus files, in order."""
    files: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix.lower() in EXTENSIONS
                           and not any(x.startswith(".") for x in p.relative_to(path).parts))
            if not found:
                raise DataError(f"folder holds no {', '.join(EXTENSIONS)} files ({what})",
                                file=part)
            files += [str(p) for p in found]
        elif path.is_file():
            files.append(part)
        else:
            raise DataError(f"no such file or folder ({what})", file=part)
    if not files:
        raise ConfigError(f"{what} names no file")
    return files


def file_format(path: str, format: str) -> str:
    if format in ("text", "jsonl"):
        return format
    if format == "json":
        return "jsonl"  # JSON Lines is the streamable form
    if format != "auto":
        raise ConfigError(f"data.format={format} cannot hold a text corpus; use auto, text "
                          f"(.txt) or jsonl (one JSON object per line)")
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"cannot tell the format from the extension (expected "
                        f"{', '.join(EXTENSIONS)}); set data.format=text or jsonl", file=path)
    return fmt


def read_documents(path: str, format: str, text_column: str,
                   separator: str) -> Iterator[Document]:
    """Every document of one file, empty ones included (the caller counts and drops them)."""
    fmt = file_format(path, format)
    if fmt == "jsonl":
        return _jsonl_documents(path, text_column)
    return _text_documents(path, separator)


def _text_lines(path: str) -> Iterator[tuple[int, str]]:
    from tunelab.data.readers import numbered_lines as decoded_lines  # BOM and UTF-16 handling

    for number, text, bad in decoded_lines(path):
        if bad:
            raise DataError("the line is not valid UTF-8; re-save the file as UTF-8",
                            file=path, line=number)
        yield number, text


def _text_documents(path: str, separator: str) -> Iterator[Document]:
    if separator == "line":
        for number, text in _text_lines(path):
            yield Document(text.strip(), path, number)
        return
    paragraph: list[str] = []
    start = 0
    for number, text in _text_lines(path):
        if text.strip():
            if not paragraph:
                start = number
            paragraph.append(text.strip())
        elif paragraph:
            yield Document("\n".join(paragraph), path, start)
            paragraph = []
    if paragraph:
        yield Document("\n".join(paragraph), path, start)


def _jsonl_documents(path: str, column: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        head = f.read(64).lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):
        raise DataError("holds a JSON array; a corpus is read as JSON Lines (one object per "
                        "line) so that it streams: convert it", file=path)
    for number, text in _text_lines(path):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (character {e.colno})", file=path,
                            line=number) from None
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object per line, got {type(value).__name__}",
                            file=path, line=number)
        if column not in value:
            keys = ", ".join(list(value)[:8])
            raise DataError(f"no field {column!r} (the object has: {keys}); set "
                            f"data.text_column", file=path, line=number, column=column)
        doc = value[column]
        if doc is not None and not isinstance(doc, str):
            raise DataError(f"expected text, got {type(doc).__name__}", file=path, line=number,
                            column=column)
        yield Document(doc or "", path, number)


# --------------------------------------------------------------------------------------------
# documents -> token cache -> blocks


@dataclass
class TokenBlocks:
    """A split's token file, read through np.memmap, cut into blocks of `block` tokens (the
    last one shorter). Nothing but the block being collated is read into memory."""

    tokens: np.ndarray
    """(n_tokens,) uint16/uint32 memmap."""
    block: int
    stats: dict

    def __post_init__(self):
        n = len(self.tokens)
        full, tail = divmod(n, self.block)
        # a last block of one token has nothing to predict from: it is dropped
        self.lengths = [self.block] * full + ([tail] if tail >= 2 else [])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.block
        return np.asarray(self.tokens[start:start + self.lengths[i]], dtype=np.int64)


def token_blocks(source: Source, tokenizer, block: int, objective: str, separator_id: int | None,
                 progress: bool = True) -> TokenBlocks:
    """Tokenise `source` into the cache (once) and view it as blocks. MLM documents carry the
    tokenizer's own special tokens ([CLS] doc [SEP]); causal-LM documents are followed by
    `separator_id` (the end-of-text token)."""
    from tunelab.models import cache_dir

    key = cache_key(source, tokenizer, objective, separator_id)
    folder = cache_dir() / "corpus" / key
    if not (folder / "meta.json").is_file():
        write_cache(folder, source, tokenizer, objective, separator_id, progress)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    if meta["tokens"]:
        tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r",
                           shape=(meta["tokens"],))
    else:
        tokens = np.zeros(0, dtype=meta["dtype"])
    blocks = TokenBlocks(tokens, block, {})
    blocks.stats = {"documents": meta["documents"], "empty_documents": meta["empty_documents"],
                    "tokens": meta["tokens"], "blocks": len(blocks), "block_size": block,
                    "cache": str(folder)}
    source.stats.update(blocks.stats)
    return blocks


def tokenizer_hash(tokenizer) -> str:
    """The tokenizer as it tokenises: its serialised fast-tokenizer pipeline (normaliser,
    vocabulary, merges, special tokens, post-processor)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def cache_key(source: Source, tokenizer, objective: str, separator_id: int | None) -> str:
    # The block size is not part of it: the file is flat, blocks are views.
    key = {"version": CACHE_VERSION, "objective": objective, "separator_id": separator_id,
           "tokenizer": tokenizer_hash(tokenizer), "source": source.fingerprint()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def write_cache(folder: Path, source: Source, tokenizer, objective: str,
                separator_id: int | None, progress: bool = True) -> None:
    """tokens.bin + meta.json, written in a temporary folder and renamed onto `folder`."""
    from tokenizers import Tokenizer
    from tqdm.auto import tqdm

    from tunelab.io import atomic_write_json, staging_dir

    # a private copy: a tokenizer.json may carry truncation/padding, which must not apply here
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = staging_dir(folder)
    try:
        documents = tokens = 0
        bar = tqdm(unit=" docs", desc="tokenize", mininterval=1.0, disable=not progress or None)
        with open(tmp / "tokens.bin", "wb") as out:
            for chunk in _chunks(source.documents()):
                encoded = backend.encode_batch([d.text for d in chunk],
                                               add_special_tokens=objective == "mlm")
                ids = [e.ids + [separator_id] if objective == "causal_lm" else e.ids
                       for e in encoded]
                flat = np.fromiter((t for x in ids for t in x), dtype=dtype,
                                   count=sum(len(x) for x in ids))
                flat.tofile(out)
                documents += len(chunk)
                tokens += len(flat)
                bar.update(len(chunk))
        bar.close()
        atomic_write_json(tmp / "meta.json", {
            "documents": documents, "empty_documents": source.stats["empty_documents"],
            "tokens": tokens, "dtype": np.dtype(dtype).name, "objective": objective,
            "source": asdict(source) | {"stats": None}, "tokenizer": type(tokenizer).__name__})
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # else another process built it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _chunks(documents: Iterator[Document]) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    chars = 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc.text)
        if len(chunk) >= CHUNK_DOCUMENTS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


# --------------------------------------------------------------------------------------------
# a run's splits


@dataclass
class CorpusData:
    """What `Task.load_data` returns for language modelling: one Source per split."""

    splits: dict[str, Source]
    objective: str
    block: int
    labels: list[str] = field(default_factory=list)
    """Language modelling learns no label set (label_map.json stays empty)."""

    def preflight(self) -> dict:
        """Files and rules per split; token counts once the splits are tokenised."""
        return {"task": self.objective, "block_size": self.block,
                "splits": {name: {"files": s.files, "take": s.take, "holdout": s.holdout,
                                  **s.stats} for name, s in self.splits.items()}}


def load_corpus(data_cfg, separator: str, objective: str, block: int) -> CorpusData:
    """The splits of a run from `data:`; reads only enough to fail early on a bad file."""
    if not data_cfg.train:
        raise ConfigError("language modelling needs a corpus: set data.train to a .txt or "
                          ".jsonl file, a folder, or several separated by commas")
    if data_cfg.test_ratio:
        raise ConfigError("data.test_ratio is not used for language modelling: give data.test "
                          "(held-out text) or hold out validation text with "
                          "data.validation_ratio")
    common = dict(format=data_cfg.format, text_column=data_cfg.text_column, separator=separator)
    train_files = expand_paths(data_cfg.train, "data.train")
    splits = {}
    if data_cfg.validation:
        splits["train"] = Source(train_files, max_documents=data_cfg.max_train_rows, **common)
        splits["validation"] = Source(expand_paths(data_cfg.validation, "data.validation"),
                                      **common)
    elif data_cfg.validation_ratio:
        ratio = data_cfg.validation_ratio
        splits["train"] = Source(train_files, holdout=ratio, take="kept",
                                 max_documents=data_cfg.max_train_rows, **common)
        splits["validation"] = Source(train_files, holdout=ratio, take="held", **common)
    else:
        splits["train"] = Source(train_files, max_documents=data_cfg.max_train_rows, **common)
    if data_cfg.test:
        splits["test"] = Source(expand_paths(data_cfg.test, "data.test"), **common)
    for source in splits.values():
        for path in source.files:
            _check_start(path, source)
    return CorpusData(splits, objective, block)


def _check_start(path: str, source: Source) -> None:
    """Read the first document of `path`: a wrong format, column or encoding fails now, not
    after a tokenizer has been trained."""
    if os.path.getsize(path) == 0:
        raise DataError("file is empty", file=path)
    for _ in read_documents(path, source.format, source.text_column, source.separator):
        break


def format_preflight(data: CorpusData) -> str:
    lines = [f"Corpus for {data.objective}, packed into blocks of {data.block} tokens:"]
    width = max(len(name) for name in data.splits)
    for name, source in data.splits.items():
        lines.append(f"  {name.ljust(width)}  {source.describe()}")
    lines.append("Documents are tokenised once into a cache; counts go to preflight.json.")
    return "\n".join(lines)
