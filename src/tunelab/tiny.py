"""Small transformer models and tokenizers built in code: the tiny models every test uses,
and the from-scratch starting point of `tunelab pretrain` (a tokenizer trained on the corpus)."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tunelab.errors import ModelError


_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_KINDS = ("bert", "gpt2", "llama", "mpnet")


def build_tiny_model(path, *, kind: str = "bert", texts: list[str], vocab_size: int = 200,
                     hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int = 64,
                     max_position: int = 128, seed: int = 0) -> Path:
    """Save a small random model and a fast tokenizer trained on ``texts`` to ``path``.

    kind: 'bert' (WordPiece, BertModel), 'mpnet' (WordPiece, MPNetModel), 'gpt2' (byte-level
    BPE, GPT2LMHeadModel) or 'llama' (byte-level BPE, ChatML template, LlamaForCausalLM, laid
    out like SmolLM2). Decoders use pad = eos. ``vocab_size`` is the tokenizer's target size;
    byte-level BPE starts from all 256 bytes + special tokens, so it learns merges only above
    that (give 512 or more for real use). The model's vocabulary is
    ``max(vocab_size, len(tokenizer))``. Same arguments and seed -> identical files.
    """
    if kind not in _KINDS:
        raise ModelError(f"unknown tiny model kind '{kind}'; expected one of {', '.join(_KINDS)}")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ModelError("build_tiny_model needs at least one non-empty text to train the tokenizer")
    import torch

    path = Path(path)
    tok = _TOKENIZER_BUILDERS[kind](texts, vocab_size, max_position)
    dims = dict(vocab=max(vocab_size, len(tok)), hidden=hidden, layers=layers, heads=heads,
                intermediate=intermediate, max_position=max_position)
    torch.manual_seed(seed)
    model = _MODEL_BUILDERS[kind](tok, **dims)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train_wordpiece(texts: Iterable[str], vocab_size: int, specials: list[str],
                    subwords: bool = True) -> dict[str, int]:
    """A WordPiece vocabulary from one pass over ``texts`` (any iterable: a corpus streams).

    Text is split exactly as BertTokenizer will split it (lowercased, CJK characters and
    punctuation isolated). The vocabulary is: ``specials``, then the characters seen (most
    frequent first while they fit), each in its word-start form ``c`` and, when it can sit
    inside a word, its continuation form ``##c`` (so an unseen word made of seen characters is
    never [UNK]); then, with ``subwords``, multi-character pieces until ``vocab_size``.
    ``subwords=False`` is the character-level vocabulary used for Chinese.

    The pieces come from plain BPE on words marked with a leading '▁' (the tokenizers WordPiece
    trainer breaks ties by hash order, so it is not deterministic; BPE ids follow the sorted
    alphabet, then the merges in order), renamed: '▁ab' -> 'ab' (starts a word), 'ab' -> '##ab'
    (continues one). Same texts -> same vocabulary.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()

    def marked_words():
        for text in texts:
            words = [w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))]
            for w in words:
                counts.update(w)
            # single characters never merge; leaving them out keeps the BPE alphabet small
            long = [w for w in words if len(w) > 1]
            if long:
                yield " ".join("\u2581" + w for w in long)

    learned: list[str] = []
    if subwords:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        # vocab_size bounds the merges we can keep; the first k merges do not depend on it
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False)
        bpe.train_from_iterator(marked_words(), trainer)
        learned = [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
                   if len(t) > 1]
    else:
        for _ in marked_words():
            pass
    budget = vocab_size - len(specials)
    chars: list[str] = []
    for c in sorted(counts, key=lambda c: (-counts[c], c)):
        cost = 1 if _isolated(c) else 2
        if cost > budget:
            break
        chars.append(c)
        budget -= cost
    pieces = [p for c in sorted(chars) for p in ((c,) if _isolated(c) else (c, "##" + c))]
    renamed = dict.fromkeys(t[1:] if t.startswith("\u2581") else "##" + t for t in learned)
    taken = set(pieces)
    pieces += [t for t in renamed if t not in taken][:max(budget, 0)]
    vocab: dict[str, int] = {}
    for piece in [*specials, *pieces]:
        vocab.setdefault(piece, len(vocab))
    return vocab


def _isolated(c: str) -> bool:
    """Whether BertTokenizer always makes ``c`` a word of its own (CJK ideographs, punctuation),
    so that it never needs a '##' continuation form."""
    import unicodedata

    cp = ord(c)
    cjk = (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
           or 0x2A700 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)
    ascii_punct = 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
    return cjk or ascii_punct or unicodedata.category(c).startswith("P")


def train_byte_bpe(texts: Iterable[str], vocab_size: int,
                   specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE (GPT-2/RoBERTa/SmolLM2 style) from one pass over ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return spec["vocab"], merges


def _bert_tokenizer(texts, vocab_size, max_position):
    from transformers import BertTokenizer  # the tokenizers-backed (fast) one in Transformers 5

    vocab = train_wordpiece(texts, vocab_size, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return BertTokenizer(vocab=vocab, model_max_length=max_position)


def _mpnet_tokenizer(texts, vocab_size, max_position):
    from transformers import MPNetTokenizer

    # Same layout as all-mpnet-base-v2: <s>=0, <pad>=1, </s>=2.
    vocab = train_wordpiece(texts, vocab_size, ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"])
    return MPNetTokenizer(vocab=vocab, model_max_length=max_position)


def _char_tokenizer(texts, vocab_size, max_position):
    from transformers import BertTokenizer

    # Character level, for Chinese: every CJK character is a token (BertTokenizer isolates
    # them); letters and digits of embedded English words and numbers spell out as c ##c ##c.
    vocab = train_wordpiece(texts, vocab_size, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                            subwords=False)
    return BertTokenizer(vocab=vocab, model_max_length=max_position)


def _roberta_tokenizer(texts, vocab_size, max_position):
    from transformers import RobertaTokenizer

    vocab, merges = train_byte_bpe(texts, vocab_size, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=max_position)


def _gpt2_tokenizer(texts, vocab_size, max_position):
    from transformers import GPT2Tokenizer

    vocab, merges = train_byte_bpe(texts, vocab_size, ["<|endoftext|>"])
    return GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>",
                         model_max_length=max_position)


def _llama_tokenizer(texts, vocab_size, max_position):
    from transformers import GPT2Tokenizer  # SmolLM2 ships a GPT2 (byte-level BPE) tokenizer too

    vocab, merges = train_byte_bpe(texts, vocab_size,
                                   ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return GPT2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>",
                         bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                         chat_template=_CHATML_TEMPLATE, model_max_length=max_position)


def bert_config(tok, *, vocab, hidden, layers, heads, intermediate, max_position):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max_position,
        pad_token_id=tok.pad_token_id)


def _bert_model(tok, **dims):
    from transformers import BertModel

    return BertModel(bert_config(tok, **dims))


def _mpnet_model(tok, *, vocab, hidden, layers, heads, intermediate, max_position):
    from transformers import MPNetConfig, MPNetModel

    # MPNet numbers positions from pad_token_id + 1 (like RoBERTa): leave room for the offset.
    return MPNetModel(MPNetConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max_position + tok.pad_token_id + 1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))


def _gpt2_model(tok, *, vocab, hidden, layers, heads, intermediate, max_position):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
        n_positions=max_position, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))


def llama_config(tok, *, vocab, hidden, layers, heads, intermediate, max_position):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate,
        max_position_embeddings=max_position, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)


def _llama_model(tok, **dims):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(tok, **dims))


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, max_position: int):
    """A tokenizer trained on ``texts`` (streamed once). kind: bert (WordPiece), mpnet
    (WordPiece, MPNet specials), char (character-level WordPiece vocabulary), roberta
    (byte-level BPE, <s> </s> <mask>), gpt2 or llama (byte-level BPE; llama has the ChatML
    template and <|im_end|> as eos/pad)."""
    if kind not in _TOKENIZER_BUILDERS:
        raise ModelError(f"unknown tokenizer kind '{kind}'; expected one of "
                         f"{', '.join(_TOKENIZER_BUILDERS)}")
    return _TOKENIZER_BUILDERS[kind](texts, vocab_size, max_position)


_TOKENIZER_BUILDERS = {"bert": _bert_tokenizer, "mpnet": _mpnet_tokenizer,
                       "gpt2": _gpt2_tokenizer, "llama": _llama_tokenizer,
                       "char": _char_tokenizer, "roberta": _roberta_tokenizer}
_MODEL_BUILDERS = {"bert": _bert_model, "mpnet": _mpnet_model,
                   "gpt2": _gpt2_model, "llama": _llama_model}
