"""Active learning: each strategy on hand-made probabilities and embeddings, and
`tunelab select` on a tiny trained run."""
import csv
import json

import numpy as np
import pytest
from conftest import toy_rows, write_csv

from tunelab.active import run_outputs, select_rows
from tunelab.cli import main
from tunelab.errors import ConfigError


def _picked(probs, strategy, n=1, embeddings=None):
    return [row for row, _ in select_rows(np.array(probs), embeddings, n, strategy)]


def test_uncertainty_margin_and_entropy_pick_what_they_measure():
    # uncertainty: the row whose best class is least likely (nearest 0.5 for two classes)
    assert _picked([[0.9, 0.1], [0.45, 0.55], [0.2, 0.8], [0.6, 0.4]], "uncertainty", 2) == [1, 3]
    # margin: the two best classes closest, even when the best is fairly likely
    closest, spread = [0.48, 0.48, 0.04], [0.4, 0.35, 0.25]
    assert _picked([spread, closest], "uncertainty") == [0]
    assert _picked([spread, closest], "margin") == [1]
    # entropy: probability spread over every class, not just the top one
    two_way, three_way = [0.45, 0.45, 0.1], [0.5, 0.25, 0.25]
    assert _picked([two_way, three_way], "uncertainty") == [0]
    assert _picked([two_way, three_way], "entropy") == [1]
    scored = select_rows(np.array([[0.45, 0.55]]), None, 1, "uncertainty")
    assert scored == [(0, pytest.approx(0.45))]


def _clusters(sizes, dim=4, seed=0):
    """Tight clusters around orthogonal directions; each cluster's first row is its centre."""
    rng = np.random.default_rng(seed)
    rows, members = [], []
    for c, size in enumerate(sizes):
        centre = np.eye(dim)[c] * 10
        offsets = rng.normal(scale=0.3, size=(size - 1, dim))
        block = np.vstack([centre, centre + offsets, centre - offsets])[:size]
        members.append(list(range(len(rows), len(rows) + size)))
        rows.extend(block)
    return np.array(rows), members


def test_diversity_takes_the_row_nearest_each_cluster_centre():
    embeddings, members = _clusters([5, 3, 2])
    probs = np.full((10, 2), 0.5)
    picks = select_rows(probs, embeddings, 3, "diversity")
    rows = [row for row, _ in picks]
    assert [next(c for c, m in enumerate(members) if row in m) for row in rows] == [0, 1, 2]
    assert [share for _, share in picks] == [0.5, 0.3, 0.2]  # largest cluster first
    assert rows[1] == members[1][0]  # 3 rows: the centre row is the mean
    assert select_rows(probs, embeddings, 3, "diversity") == picks  # seeded


def test_hybrid_picks_varied_rows_among_the_uncertain_ones():
    embeddings, members = _clusters([10, 10, 10])
    confidence = [0.5] * 10 + [0.6] * 10 + [0.99] * 10  # cluster 0 most uncertain, 2 sure
    probs = np.array([[c, 1 - c] for c in confidence])
    uncertain = _picked(probs, "uncertainty", 2)
    assert all(row in members[0] for row in uncertain)  # redundant: both from one cluster
    hybrid = select_rows(probs, embeddings, 2, "hybrid")
    assert sorted(next(c for c, m in enumerate(members) if row in m)
                  for row, _ in hybrid) == [0, 1]
    assert [score for _, score in hybrid] == pytest.approx([0.5, 0.4])  # least confidence
    with pytest.raises(ConfigError, match="unknown strategy"):
        select_rows(probs, embeddings, 2, "random")
    with pytest.raises(ConfigError, match="must be positive"):
        select_rows(probs, embeddings, 0, "margin")


@pytest.fixture(scope="module")
def trained_run(tiny_bert, toy_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("active") / "run"
    assert main(["train", f"model.name={tiny_bert}", f"data.train={toy_data['train']}",
                 f"data.validation={toy_data['validation']}", f"data.test={toy_data['test']}",
                 "train.lr=1e-3", "train.batch_size=4", "train.epochs=10",
                 "train.precision=fp32", "train.threads=1", "train.tracker=none",
                 "model.max_length=32", f"run_dir={run}"]) == 0
    return run


def _read(path):
    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in open(path, encoding="utf-8")]
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("strategy,suffix", [("margin", "csv"), ("hybrid", "jsonl"),
                                             ("diversity", "csv")])
def test_select_cli_writes_n_rows_to_label_skipping_known_rows(trained_run, toy_data, tmp_path,
                                                               strategy, suffix):
    labelled = _read(toy_data["train"])[:5]
    fresh = [r for r in toy_rows(40, 21)
             if r["text"] not in {x["text"] for x in _read(toy_data["train"])}][:12]
    rows = [{"id": i, **r} for i, r in enumerate(labelled + fresh + fresh[:2])]
    data = write_csv(tmp_path / "pile.csv", rows)
    out = tmp_path / f"to_label.{suffix}"
    assert main(["select", str(trained_run), "--data", str(data), "--n", "6", "--strategy",
                 strategy, "--out", str(out)]) == 0
    chosen = _read(out)
    assert len(chosen) == 6
    assert list(chosen[0]) == ["id", "text", "predicted_label", "prob_negative",
                               "prob_positive", "selection_score", "label"]
    assert all(r["label"] == "" for r in chosen)  # for the person to fill
    texts = [r["text"] for r in chosen]
    assert len(set(texts)) == 6 and set(texts) <= {r["text"] for r in fresh}
    for r in chosen:
        probs = float(r["prob_negative"]), float(r["prob_positive"])
        assert abs(sum(probs) - 1) < 1e-4
        assert r["predicted_label"] == ("negative" if probs[0] > probs[1] else "positive")
    if strategy == "margin":
        scores = [float(r["selection_score"]) for r in chosen]
        assert scores == sorted(scores, reverse=True)
        assert all(abs(s - (1 - abs(float(r["prob_negative"]) - float(r["prob_positive"]))))
                   < 1e-5 for s, r in zip(scores, chosen))
    # asking for more than there is: every fresh row once, none of the labelled ones
    assert main(["select", str(trained_run), "--data", str(data), "--n", "100", "--strategy",
                 strategy, "--out", str(out)]) == 0
    assert sorted(r["text"] for r in _read(out)) == sorted(r["text"] for r in fresh)


def test_run_outputs_match_the_predictor(trained_run, toy_data):
    import tunelab

    predictor = tunelab.load(trained_run)
    texts = [r["text"] for r in _read(toy_data["test"])]
    probs, vectors = run_outputs(predictor, texts, embeddings=True)
    expected = [p["scores"]["positive"] for p in predictor.predict(texts)]
    assert np.allclose(probs[:, 1], expected, atol=1e-5)
    assert vectors.shape == (len(texts), 32) and np.isfinite(vectors).all()


def test_select_cli_errors_name_the_file(trained_run, toy_data, tmp_path, capsys):
    out = str(tmp_path / "x.csv")
    wrong = write_csv(tmp_path / "wrong.csv", [{"sentence": "a fine film"}])
    assert main(["select", str(trained_run), "--data", str(wrong), "--n", "2", "--out",
                 out]) == 2
    assert "wrong.csv has no column 'text'" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n")
    assert main(["select", str(trained_run), "--data", str(empty), "--n", "2", "--out",
                 out]) == 2
    assert "empty.csv: file has no data rows" in capsys.readouterr().err
    blank = write_csv(tmp_path / "blank.csv", [{"text": "fine", "id": 1}, {"text": "", "id": 2}])
    assert main(["select", str(trained_run), "--data", str(blank), "--n", "2", "--out",
                 out]) == 2
    assert "blank.csv:3 column 'text': empty text" in capsys.readouterr().err
    assert main(["select", str(trained_run), "--data", toy_data["train"], "--n", "2", "--out",
                 out]) == 2
    assert "already in the run's data files" in capsys.readouterr().err
