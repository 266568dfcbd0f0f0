"""Load a finished token-classification run and tag text with it: the engine behind
`tunelab eval`, `tunelab predict` and the Python API for this task.

    >>> import tunelab
    >>> ner = tunelab.load("runs/conll-ner")
    >>> ner.predict(["John Smith lives in New York."])
    [{'entities': [{'type': 'PER', 'text': 'John Smith', 'start': 0, 'end': 10, 'score': 0.99},
                   {'type': 'LOC', 'text': 'New York', 'start': 20, 'end': 28, 'score': 0.98}],
      'words': ['John', 'Smith', 'lives', 'in', 'New', 'York', '.'],
      'tags': ['B-PER', 'I-PER', 'O', 'O', 'B-LOC', 'I-LOC', 'O']}]

Raw text is split into words (runs of letters/digits, each other symbol alone, every CJK
character alone, so Chinese and Japanese need no segmenter); `start`/`end` are character
offsets into the text, `text[start:end]` is the entity. Inputs longer than model.max_length
are tagged in consecutive windows, so no word goes untagged. `evaluate_file` instead encodes
exactly as training did (truncated words count as O), so it reproduces the run's numbers.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from tunelab import runs
from tunelab.data.tagging import (Sentence, _as_list, load_labeled_tagging_file, read_tagged,
                                  tagging_format)
from tunelab.data.readers import read_rows
from tunelab.errors import DataError
from tunelab.predict import load_run_model, run_uses_bf16
from tunelab.tasks import get_task
from tunelab.tasks.token_classification import encode_sentences, first_subtokens, word_tags
from tunelab.train.evaluate import evaluate, iter_logits

CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
WORD_RE = re.compile(rf"[{CJK}]|(?:(?![{CJK}])\w)+|[^\w\s]")


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Words of `text` and their (start, end) character offsets."""
    matches = list(WORD_RE.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def spans(tags: list[str], scores: list[float]) -> list[tuple[str, int, int, float]]:
    """(type, first word, last word + 1, mean probability of its words' tags, 6 decimals)
    per predicted entity."""
    from seqeval.metrics.sequence_labeling import get_entities

    return [(kind, start, end + 1, round(sum(scores[start:end + 1]) / (end + 1 - start), 6))
            for kind, start, end in get_entities(tags)]


class TaggingPredictor:
    def __init__(self, model, tokenizer, labels: list[str], max_length: int, bf16: bool,
                 batch_size: int, config):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.max_length = max_length
        self.bf16 = bf16
        self.batch_size = batch_size
        self.config = config
        self.task = get_task(config)
        self.settings = config.task.settings
        self.device = next(model.parameters()).device
        self.run_dir: Path | None = None

    @classmethod
    def from_run(cls, run_dir, precision: str = "auto", batch_size: int = 64,
                 merge: bool = True):
        """precision: auto (what the run trained with), bf16 or fp32; merge: as
        `Predictor.from_run`."""
        run_dir = Path(run_dir)
        config, env, labels = runs.read_run(run_dir)
        bf16 = run_uses_bf16(env, precision)
        model, tokenizer = load_run_model(run_dir, config, labels, env, merge, bf16)
        predictor = cls(model, tokenizer, labels, config.model.max_length, bf16, batch_size,
                        config)
        predictor.run_dir = run_dir
        return predictor

    # -- tagging ------------------------------------------------------------------------------
    def _windows(self, sentences: list[list[str]]) -> list[tuple[int, int, int]]:
        """(sentence, first word, end word) pieces that fit max_length tokens each."""
        budget = max(1, self.max_length - self.tokenizer.num_special_tokens_to_add())
        enc = self.tokenizer(sentences, is_split_into_words=True, add_special_tokens=False)
        pieces = []
        for i, words in enumerate(sentences):
            sizes = Counter(w for w in enc.word_ids(i) if w is not None)
            start, used = 0, 0
            for w in range(len(words)):
                if used + sizes[w] > budget and w > start:
                    pieces.append((i, start, w))
                    start, used = w, 0
                used += sizes[w]
            if words:
                pieces.append((i, start, len(words)))
        return pieces

    def tag(self, sentences: list[list[str]]) -> list[tuple[list[str], list[float]]]:
        """(tag, probability) of every word of every sentence; a word takes its first
        sub-token's prediction."""
        pieces = self._windows(sentences)
        out = [([], []) for _ in sentences]
        if not pieces:  # only empty inputs
            return out
        data = encode_sentences(self.tokenizer, [Sentence(sentences[i][a:b], [])
                                                 for i, a, b in pieces],
                                self.labels, self.max_length)
        o_id = self.labels.index("O")
        found: dict[int, tuple[list[int], list[float]]] = {}
        for idx, logits, batch in iter_logits(self.task, self.model, data, self.batch_size,
                                              self.tokenizer.pad_token_id, self.device,
                                              self.bf16):
            best, ids = logits.softmax(-1).max(-1)  # (B, T)
            first = first_subtokens(batch["word_ids"])
            for row, piece in enumerate(idx):
                _, a, b = pieces[piece]
                wids = batch["word_ids"][row]
                found[piece] = (word_tags(ids[row], wids, first[row], b - a, o_id).tolist(),
                                word_tags(best[row], wids, first[row], b - a, 0.0).tolist())
        for piece, (i, _, _) in enumerate(pieces):
            out[i][0].extend(self.labels[t] for t in found[piece][0])
            out[i][1].extend(found[piece][1])
        return out

    def predict_words(self, sentences: list[list[str]]) -> list[dict]:
        """Tag pre-split sentences; entity `start`/`end` are word indices (end exclusive)."""
        if sentences and isinstance(sentences[0], str):
            raise TypeError("predict_words takes a list of word lists; use predict for texts")
        out = []
        for words, (tags, scores) in zip(sentences, self.tag([list(s) for s in sentences])):
            entities = [{"type": kind, "text": " ".join(words[a:b]), "start": a, "end": b,
                         "score": score} for kind, a, b, score in spans(tags, scores)]
            out.append({"entities": entities, "words": list(words), "tags": tags})
        return out

    def predict(self, texts: list[str]) -> list[dict]:
        """Tag raw texts; entity `start`/`end` are character offsets (end exclusive)."""
        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts; wrap a single text in a list")
        split = [split_words(text) for text in texts]
        out = []
        for text, (words, offsets), (tags, scores) in zip(texts, split,
                                                           self.tag([w for w, _ in split])):
            out.append({"entities": char_entities(text, offsets, tags, scores),
                        "words": words, "tags": tags})
        return out

    # -- files --------------------------------------------------------------------------------
    def evaluate(self, sentences: list[Sentence]):
        """(metrics dict, TaggingMetrics) on labelled sentences, encoded as in training."""
        data = encode_sentences(self.tokenizer, sentences, self.labels, self.max_length,
                                self.settings.label_all_subwords)
        return evaluate(self.task, self.model, data, self.labels, self.batch_size,
                        self.tokenizer.pad_token_id, self.device, self.bf16)

    def evaluate_file(self, path: str, format: str = "auto"):
        """(metrics, TaggingMetrics, dropped sentences) for a tagged file (`tunelab eval`)."""
        sentences, problems = load_labeled_tagging_file(str(path), self.settings, self.labels,
                                                        format)
        metrics, tracker = self.evaluate(sentences)
        return metrics, tracker, problems

    def predict_file(self, path: str, format: str = "auto", chunk: int = 2048) -> list[dict]:
        """Output rows (`tunelab predict`). CoNLL input: one row per sentence with its line,
        `text` (the words joined by spaces) and `entities` (JSON, offsets into that text).
        Rows input: every row with `entities` (JSON) added, tagging the text column
        (data.text_column) or, when rows hold no text, the token lists (task.tokens_field;
        `predicted_tags` is added too)."""
        path = str(path)
        fmt = tagging_format(path, format)
        if fmt == "conll":
            raws, _, _ = read_tagged(path, self.settings, fmt, need_tags=False)
            words = [r.words for r in raws]
            texts = [" ".join(w) for w in words]
            return self._with_predictions(
                [{"line": r.lines[0], "text": t} for r, t in zip(raws, texts)], chunk,
                lambda a, b: [{"entities": _json(char_entities(text, _offsets(ws), tags, scores))}
                              for text, ws, (tags, scores)
                              in zip(texts[a:b], words[a:b], self.tag(words[a:b]))])
        rows = list(read_rows(path, fmt))
        text_column, tokens_field = self.config.data.text_column, self.settings.tokens_field
        if any(text_column in row.values for row in rows):
            texts = []
            for row in rows:
                value = row.values.get(text_column)
                if value is None or not str(value).strip():
                    raise DataError("missing or empty text; every row to tag needs one",
                                    file=path, line=row.line, column=text_column)
                texts.append(str(value))
            return self._with_predictions(
                [r.values for r in rows], chunk,
                lambda a, b: [{"entities": _json(p["entities"])} for p in self.predict(texts[a:b])])
        if not any(tokens_field in row.values for row in rows):
            raise DataError(f"rows to tag need a field '{text_column}' (raw text, "
                            f"data.text_column) or '{tokens_field}' (a list of words, "
                            f"task.tokens_field)", file=path)
        words = []
        for row in rows:
            tokens, reason = _as_list(row.values.get(tokens_field), "tokens")
            if reason is not None:
                raise DataError(reason, file=path, line=row.line, column=tokens_field)
            words.append([str(t) for t in tokens])
        return self._with_predictions(
            [r.values for r in rows], chunk,
            lambda a, b: [{"predicted_tags": _json(p["tags"]), "entities": _json(p["entities"])}
                          for p in self.predict_words(words[a:b])])

    @staticmethod
    def _with_predictions(rows: list[dict], chunk: int, predict_part) -> list[dict]:
        """Each row + the columns `predict_part(start, end)` returns for its slice."""
        from tqdm.auto import tqdm

        out = []
        with tqdm(total=len(rows), unit="sentence", desc="predict", mininterval=1.0) as bar:
            for start in range(0, len(rows), chunk):
                added = predict_part(start, start + chunk)
                out += [{**row, **extra} for row, extra in zip(rows[start:start + chunk], added)]
                bar.update(len(added))
        return out


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def char_entities(text: str, offsets: list[tuple[int, int]], tags: list[str],
                  scores: list[float]) -> list[dict]:
    out = []
    for kind, a, b, score in spans(tags, scores):
        start, end = offsets[a][0], offsets[b - 1][1]
        out.append({"type": kind, "text": text[start:end], "start": start, "end": end,
                    "score": score})
    return out


def _offsets(words: list[str]) -> list[tuple[int, int]]:
    """Character offsets of `words` in `" ".join(words)`."""
    out, pos = [], 0
    for w in words:
        out.append((pos, pos + len(w)))
        pos += len(w) + 1
    return out
