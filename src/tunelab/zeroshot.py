"""Zero-shot classification: label texts with no labelled example, three ways.

similarity  A sentence encoder (MiniLM, MPNet) embeds the text and every description of every
            label, rendered through templates ("This review is {}."); a label scores the max
            (or mean) cosine similarity of its descriptions. Cheap, and strong with encoders
            trained for sentence similarity, as all-MiniLM-L6-v2 and all-mpnet-base-v2 are.
lm          A causal LM (SmolLM2, Gemma) reads a prompt holding the text ("Review: {text}\\n
            Sentiment:") and scores each label's verbaliser words by their log-probability
            after it, averaged per token so that a two-token label is not penalised against a
            one-token one. The model's prior for each label, measured on content-free inputs
            ("N/A", "", "[MASK]"), is then divided out: contextual calibration (Zhao et al.
            2021, "Calibrate Before Use", arXiv 2102.09690), which removes the pull towards
            whichever label word is simply more frequent.
nli         A tunelab classification run trained on entailment pairs (RTE, OCNLI): premise =
            the text, hypothesis = a template filled with a label description ("This example
            is {}."); a label scores P(entailment), normalised across labels (Yin et al. 2019,
            "Benchmarking Zero-shot Text Classification", arXiv 1909.00161).

Every scorer returns (N, L) probabilities; `classify_file` adds them to each input row and,
when the file has labels, computes the same metrics as `tunelab eval`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.errors import ConfigError, DataError
from tunelab.lm_scoring import LMScorer, aggregate

SCORERS = ("similarity", "lm", "nli")
AGGREGATES = ("max", "mean")
ENTAILMENT_NAMES = ("entailment", "entails", "entailed")


# --------------------------------------------------------------------------------------------
# labels


@dataclass
class LabelSpec:
    """The labels to choose from, in id order (an integer label i in a data file means
    names[i]), with the words that describe them."""

    names: list[str]
    descriptions: dict[str, list[str]]
    """Label -> phrases embedded (similarity) or put in hypotheses (nli); default [name]."""
    verbalizers: dict[str, list[str]]
    """Label -> words the causal LM should say after the prompt (lm); default: descriptions."""


def labels_from_names(text: str) -> LabelSpec:
    """`--labels negative,positive`: each name is its own description and verbaliser."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    return _spec(names, {n: [n] for n in names}, {n: [n] for n in names}, "--labels")


def load_label_file(path: str | Path) -> LabelSpec:
    """A YAML/JSON mapping label -> description, list of descriptions, or a mapping with
    `descriptions` and/or `verbalizers` lists. Keys are the label names in id order."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataError("label file does not exist", file=str(path))
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
    except yaml.YAMLError as e:
        raise DataError(f"not valid YAML/JSON: {e}", file=str(path)) from None
    if not isinstance(tree, dict) or not tree:
        raise DataError("expected a mapping of label -> description(s), e.g. "
                        "'positive: [great, good]'", file=str(path))
    descriptions, verbalizers = {}, {}
    for key, value in tree.items():
        name = str(key).strip()
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"descriptions", "verbalizers"})
            if unknown:
                raise DataError(f"label {name!r} has unknown key {unknown[0]!r}; valid keys: "
                                "descriptions, verbalizers", file=str(path))
            desc = _phrases(value.get("descriptions", [name]), path, name, "descriptions")
            verb = _phrases(value.get("verbalizers", desc), path, name, "verbalizers")
        else:
            desc = _phrases(value if value is not None else [name], path, name, "descriptions")
            verb = desc
        descriptions[name], verbalizers[name] = desc, verb
    return _spec(list(descriptions), descriptions, verbalizers, str(path))


def _phrases(value, path: Path, label: str, what: str) -> list[str]:
    items = [value] if isinstance(value, (str, int, float)) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(v, (str, int, float)) and str(v).strip() for v in items):
        raise DataError(f"label {label!r}: {what} must be a non-empty text or a list of "
                        f"non-empty texts, got {value!r}", file=str(path))
    return [str(v).strip() for v in items]


def _spec(names, descriptions, verbalizers, where: str) -> LabelSpec:
    if len(names) < 2:
        raise ConfigError(f"{where}: zero-shot classification needs at least 2 labels, "
                          f"got {names}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a label is named twice in {names}")
    return LabelSpec(names, descriptions, verbalizers)


# --------------------------------------------------------------------------------------------
# settings


@dataclass
class ZeroShotSettings:
    scorer: str = "similarity"
    """similarity (sentence encoder), lm (causal LM) or nli (a tunelab NLI run)."""
    templates: list[str] = field(default_factory=list)
    """Templates each label description is rendered through, with {} for the description
    ("This review is {}."). Empty: ["{}"] for similarity, ["This example is {}."] for nli."""
    aggregate: str = "max"
    """How a label's score combines its descriptions x templates (or verbalisers): max or
    mean (of similarities; of probabilities for lm and nli)."""
    temperature: float = 0.05
    """similarity: probabilities are softmax(cosine / temperature). Cosines of unrelated and
    related texts differ by a few tenths; 0.05 turns that into confident probabilities."""
    prompt: str = "Text: {text}\nLabel:"
    """lm: the prompt, with {text} for the input; the verbaliser follows it."""
    verbalizer_prefix: str = " "
    """lm: put between the prompt and each verbaliser (a space for English; "" for Chinese)."""
    length_norm: bool = True
    """lm: average the verbaliser's log-probability over its tokens (else the sum)."""
    calibrate: bool = True
    """lm: contextual calibration, p ∝ p(label | text) / p(label | content-free input)."""
    entailment_label: str | None = None
    """nli: the run's label meaning entailment. Unset: the label named 'entailment'."""
    batch_size: int = 32
    """Sequences per forward pass."""
    max_length: int = 256
    """Longest input in tokens; lm keeps the end of a long prompt (where the cue is)."""

    def __post_init__(self):
        if self.scorer not in SCORERS:
            raise ConfigError(f"scorer must be one of {', '.join(SCORERS)}; got {self.scorer!r}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate must be max or mean; got {self.aggregate!r}")
        for template in self.templates:
            if template.count("{}") != 1:
                raise ConfigError(f"template {template!r} must contain {{}} exactly once "
                                  "(where the label description goes)")
        if "{text}" not in self.prompt:
            raise ConfigError(f"prompt {self.prompt!r} must contain {{text}}")
        if self.temperature <= 0:
            raise ConfigError("temperature must be positive")
        if self.batch_size <= 0 or self.max_length < 8:
            raise ConfigError("batch_size must be positive and max_length at least 8")

    def rendered_templates(self) -> list[str]:
        if self.templates:
            return list(self.templates)
        return ["This example is {}."] if self.scorer == "nli" else ["{}"]


def render(spec: LabelSpec, templates: list[str]) -> list[list[str]]:
    """Per label (in id order): every description rendered through every template."""
    return [[t.replace("{}", d) for d in spec.descriptions[name] for t in templates]
            for name in spec.names]


# --------------------------------------------------------------------------------------------
# sentence embeddings (shared with SetFit)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): the average of the non-padding token vectors, as
    sentence-transformers pools all-MiniLM-L6-v2 and all-mpnet-base-v2."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def pad_right(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x)
        mask[row, :len(x)] = 1
    return input_ids, mask


def embed_ids(model, ids: list[list[int]], pad_id: int, normalize: bool = True) -> torch.Tensor:
    """Mean-pooled (and L2-normalised) embeddings of token-id lists, with gradients."""
    input_ids, mask = pad_right(ids, pad_id)
    device = next(model.parameters()).device
    hidden = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    pooled = mean_pool(hidden.float(), mask.to(device))
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 256,
                normalize: bool = True) -> torch.Tensor:
    """(N, H) embeddings in input order; batches of similar length, no gradients."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                vectors = embed_ids(model, [ids[i] for i in idx], tokenizer.pad_token_id,
                                    normalize).cpu()
                if out is None:
                    out = torch.empty(len(ids), vectors.shape[1])
                out[idx] = vectors
    finally:
        model.train(was_training)
    return out if out is not None else torch.empty(0, 0)


# --------------------------------------------------------------------------------------------
# scorers: each maps texts -> (N, L) probabilities


class SimilarityScorer:
    def __init__(self, model, tokenizer, label_texts: list[list[str]], settings: ZeroShotSettings):
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.groups = [len(t) for t in label_texts]
        flat = [t for texts in label_texts for t in texts]
        self.label_vectors = embed_texts(model, tokenizer, flat, settings.batch_size,
                                         settings.max_length)  # (sum(groups), H)

    def similarities(self, texts: list[str]) -> torch.Tensor:
        """(N, L) cosine similarity of each text to each label (max/mean over its texts)."""
        vectors = embed_texts(self.model, self.tokenizer, texts, self.settings.batch_size,
                              self.settings.max_length)
        return aggregate(vectors @ self.label_vectors.T, self.groups, self.settings.aggregate)

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        return (self.similarities(texts) / self.settings.temperature).softmax(-1)


class NLIScorer:
    def __init__(self, predictor, hypotheses: list[list[str]], settings: ZeroShotSettings):
        self.predictor, self.settings = predictor, settings
        self.groups = [len(h) for h in hypotheses]
        self.hypotheses = [h for group in hypotheses for h in group]
        self.entailment = entailment_index(predictor.labels, settings.entailment_label)

    def entailment_probs(self, texts: list[str]) -> torch.Tensor:
        """(N, L) P(entailment | text, hypothesis), max/mean over each label's hypotheses."""
        h = len(self.hypotheses)
        premises = [t for t in texts for _ in range(h)]
        logits = self.predictor.logits(premises, self.hypotheses * len(texts))
        probs = logits.softmax(-1)[:, self.entailment].view(len(texts), h)
        return aggregate(probs, self.groups, self.settings.aggregate)

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        p = self.entailment_probs(texts)
        return p / p.sum(-1, keepdim=True).clamp(min=1e-12)


def entailment_index(labels: list[str], name: str | None) -> int:
    """The index of the run's entailment label, found by name (never by position: RTE runs
    may order their labels either way)."""
    wanted = [name] if name else list(ENTAILMENT_NAMES)
    for i, label in enumerate(labels):
        if label.strip().lower() in [w.lower() for w in wanted]:
            return i
    raise ConfigError(f"the NLI run's labels are {labels}; none is "
                      f"{' or '.join(repr(w) for w in wanted)}. Name its entailment label "
                      f"with --entailment-label")


# --------------------------------------------------------------------------------------------
# the classifier


class ZeroShotClassifier:
    """Labels texts with one of the scorers:

        spec = labels_from_names("negative,positive")
        ZeroShotClassifier.load("minilm", spec).predict(["a gripping film"])
    """

    def __init__(self, scorer, spec: LabelSpec, settings: ZeroShotSettings, model: str = ""):
        self.scorer, self.spec, self.settings, self.model = scorer, spec, settings, model

    @property
    def labels(self) -> list[str]:
        return self.spec.names

    @classmethod
    def load(cls, model: str, spec: LabelSpec,
             settings: ZeroShotSettings | None = None) -> "ZeroShotClassifier":
        from tunelab import models

        settings = settings or ZeroShotSettings()
        if settings.scorer == "nli":
            return cls(NLIScorer(_load_nli_run(model), render(spec, settings.rendered_templates()),
                                 settings), spec, settings, model)
        from transformers import AutoModel, AutoModelForCausalLM

        tokenizer = models.load_tokenizer(model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        family = models.model_family(models.load_config(model))
        if settings.scorer == "lm":
            if family != "decoder":
                raise ConfigError(f"the lm scorer needs a causal LM (smollm2, gemma3-270m, a "
                                  f"decoder folder); {model} is an {family} model: use "
                                  f"--scorer similarity")
            lm = models.load_pretrained(AutoModelForCausalLM, model)
            verbs = [spec.verbalizers[n] for n in spec.names]
            return cls(LMScorer(lm, tokenizer, verbs, settings), spec, settings, model)
        encoder = models.load_pretrained(AutoModel, model)
        return cls(SimilarityScorer(encoder, tokenizer, render(spec, settings.rendered_templates()),
                                    settings), spec, settings, model)

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """(N, L) label probabilities, columns in `labels` order."""
        if not texts:
            return torch.empty(0, len(self.labels))
        return self.scorer.probabilities(list(texts))

    def predict(self, texts: list[str]) -> list[dict]:
        """[{'label', 'score', 'scores': {label: probability}}] as tunelab.load(...).predict."""
        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts; wrap a single text in a list")
        from tunelab.predict import probabilities_as_predictions

        return probabilities_as_predictions(self.probabilities(texts), self.labels)

    def describe(self) -> dict:
        """What produced the predictions, saved beside them (zeroshot.json)."""
        return {"model": self.model, "labels": self.spec.names,
                "descriptions": self.spec.descriptions, "verbalizers": self.spec.verbalizers,
                "templates": self.settings.rendered_templates(),
                **dataclasses.asdict(self.settings)}


def _load_nli_run(run_dir: str):
    from tunelab import runs
    from tunelab.errors import ModelError

    if not runs.is_run_dir(run_dir):
        raise ModelError(f"the nli scorer needs a tunelab classification run trained on text "
                         f"pairs (RTE, OCNLI); {run_dir} is not a run directory")
    config, _, _ = runs.read_run(Path(run_dir))
    if config.task.name != "classification" or not config.data.text_pair_column:
        raise ModelError(f"{run_dir} is a {config.task.name} run on single texts; the nli "
                         "scorer needs a classification run trained on text pairs "
                         "(data.text_pair_column set), such as RTE or OCNLI")
    import tunelab

    return tunelab.load(run_dir)


def default_scorer(model: str) -> str:
    """nli for a tunelab run directory, lm for a causal LM, else similarity."""
    from tunelab import models, runs

    if runs.is_run_dir(model):
        return "nli"
    family = models.model_family(models.load_config(model))
    return "lm" if family == "decoder" else "similarity"


# --------------------------------------------------------------------------------------------
# files


def classify_file(classifier: ZeroShotClassifier, path: str, data_cfg, format: str = "auto",
                  chunk: int = 2048):
    """(output rows, metrics or None, the Metrics object or None, skipped rows).

    Every input row comes back with predicted_label, score and score_<label>. When the file
    has the label column, rows whose label is a known name (or an id into the labels) are
    evaluated; the others are returned as skipped Problems.
    """
    from tqdm.auto import tqdm

    from tunelab.data.classification import load_labeled_file, read_prediction_inputs

    rows, examples = read_prediction_inputs(path, data_cfg, format)
    labelled, problems = None, []
    if any(data_cfg.label_column in row.values for row in rows):  # checked before the work
        labelled_cfg = dataclasses.replace(data_cfg, labels=list(classifier.labels))
        labelled, problems = load_labeled_file(path, labelled_cfg, classifier.labels, format)
    probs = torch.empty(len(examples), len(classifier.labels))
    with tqdm(total=len(examples), unit="text", desc="zero-shot", mininterval=1.0) as bar:
        for start in range(0, len(examples), chunk):
            part = [e.text for e in examples[start:start + chunk]]
            probs[start:start + len(part)] = classifier.probabilities(part)
            bar.update(len(part))
    out_rows = []
    for row, p in zip(rows, probs):
        best = int(p.argmax())
        out_rows.append({**row.values, "predicted_label": classifier.labels[best],
                         "score": round(float(p[best]), 6),
                         **{f"score_{n}": round(float(v), 6)
                            for n, v in zip(classifier.labels, p)}})
    if labelled is None:
        return out_rows, None, None, []
    metrics, tracker = score_examples(probs, rows, labelled, classifier.labels)
    return out_rows, metrics, tracker, problems


def score_examples(probs: torch.Tensor, rows, labelled, labels: list[str]):
    """Metrics of the predictions `probs` (one per row) on the labelled examples among them."""
    from tunelab.tasks.classification import ClassificationMetrics

    index = {row.line: i for i, row in enumerate(rows)}
    picked = [index[int(e.source.rsplit(":", 1)[1])] for e in labelled]
    tracker = ClassificationMetrics(labels)
    gold = torch.tensor([e.label for e in labelled], dtype=torch.long)
    tracker.update(probs[picked].clamp(min=1e-12).log(), {"labels": gold})
    return tracker.compute(), tracker
