"""Small transformer models and tokenizers built in code: the tiny models every test uses,
and the from-scratch starting point of `tunelab pretrain` (a tokenizer trained on the corpus)."""
from __future__ import annotations

import json
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


def _train_wordpiece(texts, vocab_size, specials) -> dict[str, int]:
    """A WordPiece vocabulary, the same for the same texts (the tokenizers WordPiece trainer
    breaks ties by hash order, so it is not). Trains plain BPE on words marked with a leading
    '▁' (deterministic: ids follow the sorted alphabet), then renames: '▁ab' -> 'ab' (starts a
    word), 'ab' -> '##ab' (continues one). Every character gets both forms, so no [UNK] for
    unseen words made of seen characters."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    # Split text exactly as BertTokenizer/MPNetTokenizer will: lowercased, Bert pre-split.
    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = [[w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(t))] for t in texts]
    chars = sorted({c for ws in words for w in ws for c in w})
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Its vocabulary is '\u2581' + chars + merges; the chars come back twice below.
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - len(specials) - len(chars) + 1, 1),
                                  min_frequency=1, show_progress=False)
    bpe.train_from_iterator([" ".join("\u2581" + w for w in ws) for ws in words], trainer)
    learned = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [p for c in chars for p in (c, "##" + c)]
    pieces += [t[1:] if t.startswith("\u2581") else "##" + t for t, _ in learned if t != "\u2581"]
    vocab: dict[str, int] = {}
    for piece in [*specials, *pieces]:
        vocab.setdefault(piece, len(vocab))
    return vocab


def _train_byte_bpe(texts, vocab_size, specials) -> tuple[dict[str, int], list[tuple[str, str]]]:
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

    vocab = _train_wordpiece(texts, vocab_size, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return BertTokenizer(vocab=vocab, model_max_length=max_position)


def _mpnet_tokenizer(texts, vocab_size, max_position):
    from transformers import MPNetTokenizer

    # Same layout as all-mpnet-base-v2: <s>=0, <pad>=1, </s>=2.
    vocab = _train_wordpiece(texts, vocab_size, ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"])
    return MPNetTokenizer(vocab=vocab, model_max_length=max_position)


def _gpt2_tokenizer(texts, vocab_size, max_position):
    from transformers import GPT2Tokenizer

    vocab, merges = _train_byte_bpe(texts, vocab_size, ["<|endoftext|>"])
    return GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>",
                         model_max_length=max_position)


def _llama_tokenizer(texts, vocab_size, max_position):
    from transformers import GPT2Tokenizer  # SmolLM2 ships a GPT2 (byte-level BPE) tokenizer too

    vocab, merges = _train_byte_bpe(texts, vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return GPT2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>",
                         bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                         chat_template=_CHATML_TEMPLATE, model_max_length=max_position)


def _bert_model(tok, *, vocab, hidden, layers, heads, intermediate, max_position):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max_position,
        pad_token_id=tok.pad_token_id))


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


def _llama_model(tok, *, vocab, hidden, layers, heads, intermediate, max_position):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate,
        max_position_embeddings=max_position, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))


_TOKENIZER_BUILDERS = {"bert": _bert_tokenizer, "mpnet": _mpnet_tokenizer,
                       "gpt2": _gpt2_tokenizer, "llama": _llama_tokenizer}
_MODEL_BUILDERS = {"bert": _bert_model, "mpnet": _mpnet_model,
                   "gpt2": _gpt2_model, "llama": _llama_model}
