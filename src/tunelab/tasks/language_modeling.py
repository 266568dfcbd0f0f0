"""Language modelling on unlabelled text: masked LM (`mlm`) and causal LM (`causal_lm`), from
scratch (`model.size`) or continued from a pretrained model (domain-adaptive pretraining).

Masked LM follows BERT (Devlin et al. 2019, arXiv 1810.04805): 15% of the tokens are chosen,
of which 80% become [MASK], 10% a random token and 10% stay; only the chosen ones are
predicted. Whole-word masking chooses all pieces of a word together (Cui et al. 2019,
"Pre-Training with Whole Word Masking for Chinese BERT", arXiv 1906.08101); with the
character-level Chinese tokenizer every character is a word. Causal LM predicts every token
from those before it.

The corpus is tokenised once into a cache (`data.corpus`) and read as blocks of
`model.max_length` tokens; documents are packed back to back ([CLS] doc [SEP] for MLM, doc
+ end-of-text for causal LM), so no position is padding except in the last block. The masks
of a batch depend only on (train.seed, the batch's block indices): a resumed run masks exactly
as the uninterrupted one, and every evaluation sees the same masks.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tunelab.data.corpus import SEPARATORS, CorpusData, Source, TokenBlocks
from tunelab.errors import ConfigError, DataError
from tunelab.tasks import register_task
from tunelab.tasks.base import BuiltModel, Task, TaskSettings, load_with_head

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1
"""Of the chosen tokens: 80% [MASK], 10% random, the remaining 10% unchanged (BERT)."""
SHOWN_TOKENS = 160


@dataclass
class LanguageModelSettings(TaskSettings):
    document_separator: str = "line"
    """How a .txt corpus splits into documents: line (one document per line) or blank_line
    (paragraphs: consecutive non-blank lines form one document)."""

    def __post_init__(self):
        if self.document_separator not in SEPARATORS:
            raise ConfigError(f"task.document_separator must be one of {', '.join(SEPARATORS)}; "
                              f"got {self.document_separator!r}")


@dataclass
class MaskedLMSettings(LanguageModelSettings):
    mlm_probability: float = 0.15
    """Share of tokens chosen for prediction (special tokens never are); of those 80% become
    [MASK], 10% a random token and 10% stay unchanged."""
    whole_word_mask: bool = False
    """Choose whole words instead of single tokens: all pieces of a word (WordPiece '##'
    continuations, byte-level BPE pieces without a leading 'Ġ', sentencepiece pieces without
    '▁') are chosen together. With the char tokenizer every Chinese character is a word."""

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"task.mlm_probability must be in (0, 1); got {self.mlm_probability}")


# --------------------------------------------------------------------------------------------
# encoded blocks and what masking needs to know about the vocabulary


@dataclass
class Vocab:
    special: torch.Tensor
    """(V,) bool: special tokens, never chosen for masking."""
    word_start: torch.Tensor
    """(V,) bool: the token starts a word (whole-word masking)."""
    replacements: torch.Tensor
    """Ids a chosen token may be replaced with at random (every non-special token)."""
    mask_id: int | None


def vocab_info(tokenizer) -> Vocab:
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = torch.zeros(size, dtype=torch.bool)
    special[[i for i in tokenizer.all_special_ids if i < size]] = True
    if any(t.startswith("##") for t in tokens):  # WordPiece: '##' continues a word
        start = [not t.startswith("##") for t in tokens]
    elif any(t.startswith("\u0120") for t in tokens):  # byte-level BPE: 'Ġ' = a space before
        start = [t.startswith("\u0120") for t in tokens]
    elif any(t.startswith("\u2581") for t in tokens):  # sentencepiece: '▁' = a space before
        start = [t.startswith("\u2581") for t in tokens]
    else:
        start = [True] * size
    word_start = torch.tensor(start, dtype=torch.bool) | special
    return Vocab(special, word_start, torch.nonzero(~special).flatten(), tokenizer.mask_token_id)


@dataclass
class Encoded:
    """A split as token blocks (a view on the memmapped token cache)."""

    blocks: TokenBlocks
    vocab: Vocab
    truncated: int = 0
    """Packing cuts documents at block boundaries but drops no text."""

    @property
    def lengths(self) -> list[int]:
        return self.blocks.lengths

    def __len__(self) -> int:
        return len(self.blocks)


def pack(data: Encoded, indices: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids of the chosen blocks and their attention mask (only a last block is short)."""
    width = max(data.lengths[i] for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        block = torch.from_numpy(data.blocks[i])
        ids[row, :len(block)] = block
        mask[row, :len(block)] = 1
    return ids, mask


def batch_seed(seed: int, indices: list[int]) -> int:
    """The masking seed of a batch: a function of train.seed and the blocks it holds only."""
    text = f"{seed}:" + ",".join(map(str, indices))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def mask_tokens(ids: torch.Tensor, attention: torch.Tensor, vocab: Vocab, probability: float,
                whole_word: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of (B, T) ids -> (inputs, labels); labels are -100 where nothing is
    predicted. Every row with a maskable token gets at least one prediction."""
    special = vocab.special[ids] | (attention == 0)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    if whole_word:
        start = vocab.word_start[ids] | special
        start[:, 0] = True
        # (B, T) position of the first piece of each token's word
        first = torch.where(start, positions, 0).cummax(dim=1).values
    else:
        first = positions
    draws = torch.rand(ids.shape, generator=generator).gather(1, first)  # one draw per word
    chosen = (draws < probability) & ~special
    fallback = torch.rand(ids.shape, generator=generator).masked_fill(special, -1).argmax(1)
    empty = ~chosen.any(1) & (~special).any(1)
    chosen |= empty[:, None] & ~special & (first == first.gather(1, fallback[:, None]))
    labels = ids.masked_fill(~chosen, -100)
    action = torch.rand(ids.shape, generator=generator)
    random_ids = vocab.replacements[torch.randint(len(vocab.replacements), ids.shape,
                                                  generator=generator)]
    inputs = torch.where(chosen & (action < MASK_SHARE), vocab.mask_id, ids)
    inputs = torch.where(chosen & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE),
                         random_ids, inputs)
    return inputs, labels


def shift_labels(ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """labels[t] = ids[t + 1]: the loss and the item count need no shifting later."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
    return labels


# --------------------------------------------------------------------------------------------
# metrics


class LanguageModelMetrics:
    """Loss per predicted token, perplexity = exp(loss), and top-1 accuracy of the predicted
    tokens, streamed: three running sums."""

    def __init__(self):
        self.loss_sum, self.correct, self.n = 0.0, 0, 0

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        labels = batch["labels"]
        keep = labels != -100
        picked, target = logits[keep].float(), labels[keep]  # (N, V), (N,)
        self.loss_sum += F.cross_entropy(picked, target, reduction="sum").item()
        self.correct += int((picked.argmax(-1) == target).sum())
        self.n += int(keep.sum())

    def compute(self) -> dict[str, float]:
        if not self.n:
            return {"loss": math.nan, "perplexity": math.nan, "accuracy": math.nan, "n": 0}
        loss = self.loss_sum / self.n
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                "accuracy": self.correct / self.n, "n": self.n}

    def state(self) -> torch.Tensor:
        return torch.tensor([self.loss_sum, self.correct, self.n], dtype=torch.double)

    def load_state(self, state: torch.Tensor) -> None:
        self.loss_sum, self.correct, self.n = float(state[0]), int(state[1]), int(state[2])

    def report(self) -> str:
        m = self.compute()
        return (f"perplexity {m['perplexity']:.3f}    loss {m['loss']:.4f}    "
                f"accuracy {m['accuracy']:.4f}    predicted tokens n = {m['n']:,}")

    def save_artifacts(self, folder, name: str, title: str) -> dict:
        return {}  # nothing to plot: the figures are the metrics themselves


# --------------------------------------------------------------------------------------------
# the tasks


class LanguageModelTask(Task):
    """What masked and causal LM share: data, model building, loss, metrics, predictor."""

    settings_class = LanguageModelSettings
    metrics = ("loss", "perplexity", "accuracy")
    has_labels = False
    builds_from_scratch = True
    families: ClassVar[tuple[str, ...]]
    auto_class: ClassVar[str]

    def load_data(self) -> CorpusData:
        from tunelab.data.corpus import load_corpus

        return load_corpus(self.config.data, self.settings.document_separator, self.name,
                           self.config.model.max_length)

    def format_preflight(self, data: CorpusData) -> str:
        from tunelab.data.corpus import format_preflight

        return format_preflight(data)

    def build_model(self, labels: list[str]) -> BuiltModel:
        built = self._from_scratch() if self.config.model.size else self._pretrained()
        self.check_tokenizer(built.tokenizer, built.source)
        return built

    def _from_scratch(self) -> BuiltModel:
        from tunelab import pretrain
        from tunelab.methods import registry

        cfg = self.config
        if registry.get_method(cfg.method.name).saves != "model":
            raise ConfigError(f"model.size builds a random model: every weight must train, so "
                              f"use method.name=full (not {cfg.method.name}); adapter methods "
                              f"need a pretrained model (model.name)")
        train = self.load_data().splits["train"]
        tokenizer = pretrain.scratch_tokenizer(cfg.model, self.name, train)
        model = pretrain.scratch_model(self.name, cfg.model.size, tokenizer, cfg.model.max_length,
                                       cfg.train.seed, cfg.model.architecture, cfg.model.dropout)
        family = "encoder" if self.name == "mlm" else "decoder"
        return BuiltModel(model, tokenizer, [], family,
                          f"{cfg.model.size} {model.config.model_type} from scratch")

    def _pretrained(self) -> BuiltModel:
        import transformers

        from tunelab import models

        cfg = self.config
        config = models.load_config(cfg.model.name)
        family = models.model_family(config)
        if family not in self.families:
            other = "causal_lm" if self.name == "mlm" else "mlm"
            raise ConfigError(f"task {self.name} needs a {' or '.join(self.families)} model; "
                              f"{cfg.model.name} is a {family} model (use task {other})")
        positions = getattr(config, "max_position_embeddings", None)
        if positions and cfg.model.max_length > positions:
            raise ConfigError(f"model.max_length={cfg.model.max_length} exceeds the "
                              f"{positions} positions of {cfg.model.name}")
        return load_with_head(getattr(transformers, self.auto_class), cfg.model.name,
                              cfg.train.seed)

    def check_tokenizer(self, tokenizer, source: str) -> None:
        raise NotImplementedError

    def separator_id(self, tokenizer) -> int | None:
        """The token appended to each document (causal LM); MLM uses the tokenizer's own."""
        return None

    def encode(self, tokenizer, source: Source) -> Encoded:
        from tunelab.data.corpus import token_blocks

        blocks = token_blocks(source, tokenizer, self.config.model.max_length, self.name,
                              self.separator_id(tokenizer))
        if not len(blocks):
            raise DataError(f"this split holds no text ({source.describe()}; "
                            f"{blocks.stats['documents']} documents): with a ratio split, give "
                            f"more documents, a larger data.validation_ratio or data.validation",
                            file=source.files[0])
        return Encoded(blocks, vocab_info(tokenizer))

    def loss_sum(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the predicted tokens, in fp32, computed on those rows of
        the logits only. `logits` covers every position (batch, length, vocabulary) or, from
        `train_logits`, the predicted positions only (n, vocabulary) in row-major order."""
        labels = batch["labels"]
        keep = labels != -100
        rows = logits if logits.dim() == 2 else logits[keep]
        return F.cross_entropy(rows.float(), labels[keep], reduction="sum"), int(keep.sum())

    def new_metrics(self, labels: list[str]) -> LanguageModelMetrics:
        return LanguageModelMetrics()

    def load_predictor(self, run_dir, **kwargs):
        from tunelab.predict_lm import LMPredictor

        return LMPredictor.from_run(run_dir, **kwargs)


@register_task
class MaskedLMTask(LanguageModelTask):
    name = "mlm"
    summary = "masked language modelling on unlabelled text (BERT-style), from scratch or continued"
    settings_class = MaskedLMSettings
    auto_class = "AutoModelForMaskedLM"
    peft_task_type = None
    families = ("encoder", "mpnet")

    def check_tokenizer(self, tokenizer, source: str) -> None:
        if tokenizer.mask_token_id is None:
            raise ConfigError(f"the tokenizer of {source} has no mask token: masked LM needs "
                              f"one (use task causal_lm, or another tokenizer)")

    def train_logits(self, model, batch: dict) -> torch.Tensor:
        """Vocabulary logits at the masked positions only: the MLM head (a hidden x vocabulary
        projection) would otherwise run on every position, ~60% of a tiny model's step at 15%
        masking. Only for a bare *ForMaskedLM model; a wrapped one (PEFT, DDP, FSDP) runs whole,
        so that its hooks see the forward pass."""
        split = _encoder_and_head(model)
        if split is None:
            return super().train_logits(model, batch)
        encoder, head = split
        hidden = encoder(**self.model_inputs(batch)).last_hidden_state
        return head(hidden[batch["labels"] != -100])

    def collate(self, data: Encoded, indices: list[int], pad_id: int) -> dict:
        ids, attention = pack(data, indices, pad_id)
        generator = torch.Generator().manual_seed(batch_seed(self.config.train.seed, indices))
        inputs, labels = mask_tokens(ids, attention, data.vocab, self.settings.mlm_probability,
                                     self.settings.whole_word_mask, generator)
        return {"input_ids": inputs, "attention_mask": attention, "labels": labels}

    def show_example(self, tokenizer, data: Encoded, index: int) -> str:
        original = data.blocks[index]
        batch = self.collate(data, [index], tokenizer.pad_token_id)
        inputs, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        shown = []
        for orig, inp, label in list(zip(original.tolist(), inputs, labels))[:SHOWN_TOKENS]:
            token = tokenizer.convert_ids_to_tokens(orig)
            if label == -100:
                shown.append(token)
            else:
                now = "" if inp == orig else "→" + tokenizer.convert_ids_to_tokens(inp)
                shown.append(f"⟨{token}{now}⟩")
        more = " ..." if len(original) > SHOWN_TOKENS else ""
        return (f"block of {len(original)} tokens, {sum(x != -100 for x in labels)} predicted, "
                f"shown as ⟨original→input⟩ (⟨original⟩ = kept as is):\n  "
                + " ".join(shown) + more)


@register_task
class CausalLMTask(LanguageModelTask):
    name = "causal_lm"
    summary = "causal (next-token) language modelling on unlabelled text, from scratch or continued"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    families = ("decoder",)

    def check_tokenizer(self, tokenizer, source: str) -> None:
        self.separator_id(tokenizer)

    def separator_id(self, tokenizer) -> int:
        found = tokenizer.eos_token_id if tokenizer.eos_token_id is not None \
            else tokenizer.sep_token_id
        if found is None:
            raise ConfigError("the tokenizer has no end-of-text (eos) token to end documents with")
        return found

    def collate(self, data: Encoded, indices: list[int], pad_id: int) -> dict:
        ids, attention = pack(data, indices, pad_id)
        return {"input_ids": ids, "attention_mask": attention,
                "labels": shift_labels(ids, attention)}

    def show_example(self, tokenizer, data: Encoded, index: int) -> str:
        tokens = tokenizer.convert_ids_to_tokens(data.blocks[index].tolist())
        more = " ..." if len(tokens) > SHOWN_TOKENS else ""
        return (f"block of {len(tokens)} tokens; each one after the first is predicted from "
                f"those before it:\n  " + " ".join(tokens[:SHOWN_TOKENS]) + more)


def _encoder_and_head(model):
    """(encoder, MLM head) of a bare Transformers *ForMaskedLM whose head is one module that
    maps hidden states to vocabulary logits position by position (BERT's `cls`, RoBERTa's and
    MPNet's `lm_head`), else None."""
    if not type(model).__name__.endswith("ForMaskedLM"):
        return None
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = next((getattr(model, n) for n in ("cls", "lm_head") if hasattr(model, n)), None)
    names = {n for n, _ in model.named_children()}
    if encoder is None or head is None or len(names) != 2:
        return None
    return encoder, head
