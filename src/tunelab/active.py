"""Active learning: which unlabelled rows should a person label next?

Labelling is the expensive part of a small project; rows the model already classifies with
confidence teach it little. `tunelab select` scores a file of unlabelled rows with a trained
run and writes the N most informative ones, with the model's guess, for a person to label
(Settles 2009, "Active Learning Literature Survey", sections 3.1 and 5.1):

  uncertainty  least confidence: 1 - max_c p(c)
  margin       1 - (p(best) - p(second best)): rows between two classes
  entropy      -sum_c p(c) log p(c): uncertainty over all classes
  diversity    k-means (k-means++ seeding) with N clusters on the run's sentence embeddings
               (the mean-pooled last hidden state); the row nearest each centre, so the batch
               covers the data instead of N near-copies of one confusing row
  hybrid       the 10 x N least-confident rows, then diversity among them: uncertain *and*
               varied, the idea of BADGE (Ash et al. 2020, arXiv 1906.03671) without its
               gradient embeddings

Uncertainty strategies alone tend to pick redundant batches (the same borderline phrasing
many times); diversity alone picks easy rows too. hybrid is the usual default when N is large.
Rows already in the run's data files (training, validation and test) and repeated texts are
skipped: labelling them again gains nothing, and a test row moved into training would leak.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import ConfigError, DataError

STRATEGIES = ("uncertainty", "margin", "entropy", "diversity", "hybrid")
HYBRID_POOL = 10
"""hybrid: the diversity step chooses among this many times N of the least-confident rows."""


def least_confidence(probs: np.ndarray) -> np.ndarray:
    return 1.0 - probs.max(1)


def margin(probs: np.ndarray) -> np.ndarray:
    top = np.sort(probs, axis=1)
    return 1.0 - (top[:, -1] - top[:, -2])


def entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(1)


SCORES = {"uncertainty": least_confidence, "margin": margin, "entropy": entropy}


def diverse_rows(embeddings: np.ndarray, n: int, seed: int = 0) -> list[tuple[int, float]]:
    """(row, share of the rows its cluster holds) for n rows: k-means with n clusters on the
    L2-normalised embeddings (cosine geometry, as sentence encoders are compared), and the row
    nearest each centre, largest cluster first."""
    from sklearn.cluster import KMeans

    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    if n >= len(x):
        return [(i, 1.0 / len(x)) for i in range(len(x))]
    kmeans = KMeans(n_clusters=n, init="k-means++", n_init=3, random_state=seed).fit(x)
    distances = kmeans.transform(x)  # (M, n)
    sizes = np.bincount(kmeans.labels_, minlength=n)
    picks, used = [], set()
    for centre in np.argsort(-sizes, kind="stable"):
        # two centres can share a nearest row (repeated embeddings): take the next one
        row = next(int(i) for i in np.argsort(distances[:, centre], kind="stable")
                   if i not in used)
        used.add(row)
        picks.append((row, round(float(sizes[centre]) / len(x), 6)))
    return picks


def select_rows(probs: np.ndarray, embeddings: np.ndarray | None, n: int, strategy: str,
                seed: int = 0) -> list[tuple[int, float]]:
    """(row, score) of the n rows to label, most informative first."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if n <= 0:
        raise ConfigError(f"the number of rows to select must be positive, got {n}")
    if strategy in SCORES:
        scores = SCORES[strategy](probs)
        return [(int(i), float(scores[i])) for i in np.argsort(-scores, kind="stable")[:n]]
    if embeddings is None:
        raise ConfigError(f"strategy {strategy} needs the rows' embeddings")
    if strategy == "diversity":
        return diverse_rows(embeddings, n, seed)
    scores = least_confidence(probs)
    candidates = np.argsort(-scores, kind="stable")[:HYBRID_POOL * n]
    picks = [int(candidates[i]) for i, _ in diverse_rows(embeddings[candidates], n, seed)]
    return sorted(((i, float(scores[i])) for i in picks), key=lambda p: -p[1])


def run_outputs(predictor, texts: list[str], pairs: list[str] | None = None,
                embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """((N, C) probabilities, (N, H) mean-pooled last hidden states or None) of a
    classification run, in input order, from one forward pass per batch."""
    from tunelab.tasks.classification import collate
    from tunelab.train.batching import eval_batches
    from tunelab.train.evaluate import autocast
    from tunelab.zeroshot import mean_pool

    data = predictor.encode(texts, pairs)
    probs = np.empty((len(texts), len(predictor.labels)), dtype=np.float64)
    vectors = None
    model, device = predictor.model, predictor.device
    with torch.inference_mode(), autocast(device.type, predictor.bf16):
        for idx in eval_batches(data.lengths, predictor.batch_size):
            batch = collate(data, idx, predictor.tokenizer.pad_token_id)
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            out = model(**inputs, output_hidden_states=embeddings)
            probs[idx] = out.logits.float().softmax(-1).cpu().numpy()
            if embeddings:
                mask = inputs["attention_mask"]
                hidden = out.hidden_states[-1][:, -mask.shape[1]:]  # prompt tuning prepends
                pooled = mean_pool(hidden.float(), mask).cpu().numpy()  # (B, H)
                if vectors is None:
                    vectors = np.empty((len(texts), pooled.shape[1]), dtype=np.float64)
                vectors[idx] = pooled
    return probs, vectors


def labelled_keys(data_cfg) -> set[tuple[str, str | None]]:
    """(text, pair) of every usable row in the run's training, validation and test files."""
    from tunelab.data.classification import load_classification_data

    cfg = dataclasses.replace(data_cfg, max_train_rows=None)
    for split in ("train", "validation", "test"):
        path = getattr(cfg, split)
        if path is not None and not Path(path).is_file():
            raise DataError(f"the run's {split} file is not here; select skips the rows "
                            "already labelled, so run it from the folder the run was trained "
                            "in", file=path)
    data = load_classification_data(cfg)
    return {(e.text, e.text_pair) for rows in data.splits.values() for e in rows}


@dataclasses.dataclass
class Selection:
    rows: list[dict]
    """The chosen rows, most informative first, ready to write."""
    candidates: int
    """Rows scored (after skipping)."""
    skipped_labelled: int
    skipped_repeats: int


def select_file(predictor, path: str, n: int, strategy: str, seed: int = 0) -> Selection:
    """Score the rows of `path` with a classification run and choose n to label. Each output
    row: the input's columns, `predicted_label`, `prob_<label>` per label, `selection_score`,
    and the run's label column, empty, for the person to fill (it replaces any value the input
    had there)."""
    from tunelab.data.classification import read_prediction_inputs

    cfg = predictor.config.data
    rows, examples = read_prediction_inputs(str(path), cfg)
    known, seen, keep, labelled, repeats = labelled_keys(cfg), set(), [], 0, 0
    for i, e in enumerate(examples):
        key = (e.text, e.text_pair)
        if key in known:
            labelled += 1
        elif key in seen:
            repeats += 1
        else:
            seen.add(key)
            keep.append(i)
    if not keep:
        raise DataError(f"all {len(rows)} rows are already in the run's data files (or "
                        "repeated): nothing left to select", file=str(path))
    texts = [examples[i].text for i in keep]
    pairs = [examples[i].text_pair or "" for i in keep] if cfg.text_pair_column else None
    probs, vectors = run_outputs(predictor, texts, pairs, strategy in ("diversity", "hybrid"))
    out = []
    for row, score in select_rows(probs, vectors, n, strategy, seed):
        values = {k: v for k, v in rows[keep[row]].values.items() if k != cfg.label_column}
        p = probs[row]
        out.append({**values, "predicted_label": predictor.labels[int(p.argmax())],
                    **{f"prob_{name}": round(float(v), 6) for name, v in
                       zip(predictor.labels, p)},
                    "selection_score": round(score, 6), cfg.label_column: ""})
    return Selection(out, len(keep), labelled, repeats)


def describe(selection: Selection, strategy: str, output: str) -> str:
    """The command's summary: what was written, what was skipped, the guesses' balance."""
    guesses = Counter(r["predicted_label"] for r in selection.rows)
    balance = ", ".join(f"{label} {count}" for label, count in guesses.most_common())
    skipped = []
    if selection.skipped_labelled:
        skipped.append(f"{selection.skipped_labelled} already in the run's data")
    if selection.skipped_repeats:
        skipped.append(f"{selection.skipped_repeats} repeated")
    return (f"{len(selection.rows)} of {selection.candidates} rows selected by {strategy}"
            f"{' (skipped: ' + ', '.join(skipped) + ')' if skipped else ''}; the model guesses "
            f"{balance}. Written to {output}: fill its label column, then add the rows to "
            "your training file.")
