"""Instruction tuning of a causal LM: conversations rendered with a chat template, loss on the
responses only.

Encoding renders each conversation with the tokenizer's chat template and finds every
assistant response by rendering prefixes: the prompt before turn k (with the generation
prompt) and the conversation through turn k must both be prefixes of the whole rendering, so
the response is the text between them, whatever the template. Tokens of the responses count
in the loss, up to and including the first eos token after each; when the template writes no
eos there, one is appended (the preflight says so). Models that never learn to emit eos never
stop. Labels are stored shifted for next-token prediction: labels[t] is the token at t + 1
where that token counts, else -100.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.errors import ConfigError, ModelError
from tunelab.tasks import register_task
from tunelab.tasks.base import BuiltModel, Task, TaskSettings, load_with_head

IGNORE = -100

ALPACA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% else %}{{ 'Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
)
"""The Stanford Alpaca prompt (a system message replaces its first sentence); the user turn
already ends with '### Response:', so the generation prompt adds nothing."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML as Qwen and SmolLM2 use it, without a default system message."""

TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "chatml": CHATML_TEMPLATE}


@dataclass
class InstructionSettings(TaskSettings):
    template: str = "auto"
    """Chat template: auto (the tokenizer's own when it has one, else alpaca), alpaca (the
    Stanford Alpaca prompt: '### Instruction: ... ### Response:') or chatml
    (<|im_start|>role ... <|im_end|>). The run's tokenizer is saved with it."""
    system_prompt: str | None = None
    """System message for conversations that bring none (also used when generating)."""
    train_on_prompt: bool = False
    """Also put the prompt tokens (system, user turns, template text) in the loss. Default:
    only the responses and the eos token after each count."""
    instruction_field: str = "instruction"
    """Alpaca records: the field holding the instruction."""
    input_field: str = "input"
    """Alpaca records: the optional field holding the input (appended after a blank line)."""
    output_field: str = "output"
    """Alpaca records: the field holding the response."""
    system_field: str = "system"
    """Optional per-record system message (Alpaca and ShareGPT records)."""
    history_field: str = "history"
    """Alpaca records: optional earlier turns as [[prompt, response], ...]."""
    messages_field: str = "messages"
    """Chat records: the list of {role, content} messages (OpenAI style)."""
    conversations_field: str = "conversations"
    """ShareGPT records: the list of {from, value} turns (human, gpt, system)."""

    def __post_init__(self):
        valid = ("auto", *TEMPLATES)
        if self.template not in valid:
            raise ConfigError(f"task.template must be one of {', '.join(valid)}; "
                              f"got {self.template!r}")


def chat_template(tokenizer, name: str) -> str:
    """The Jinja template `name` means for this tokenizer (see InstructionSettings.template)."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    own = tokenizer.chat_template
    if isinstance(own, dict):  # several named templates
        own = own.get("default")
    return own or ALPACA_TEMPLATE


def describe_template(tokenizer) -> str:
    names = {text: name for name, text in TEMPLATES.items()}
    return names.get(tokenizer.chat_template, "the tokenizer's own")


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


# --------------------------------------------------------------------------------------------
# encoding


@dataclass
class Encoded:
    """Token ids and shifted labels of one split, unpadded."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    sources: list[str]
    truncated: int
    """Conversations cut at model.max_length (kept: some response tokens remain)."""
    dropped: list
    """Conversations left out because no response token fits (data.instructions Problems)."""
    eos_appended: int
    """Responses the template ends without the eos token, which was therefore appended."""
    responses: int

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)


def response_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn in it."""
    text = render(tokenizer, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], generation_prompt=True)
        through = render(tokenizer, messages[:k + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ConfigError(
                f"the chat template does not render conversations turn by turn (the prompt "
                f"before message {k + 1} is not a prefix of the whole conversation), so the "
                f"response tokens cannot be found; set task.template=chatml or alpaca")
        spans.append((len(before), len(through)))
    return text, spans


def mark_responses(ids: list[int], offsets, text: str, spans,
                   eos_id: int) -> tuple[list[bool], int]:
    """Flag the tokens of each response up to and including its eos token; where a response
    has none, insert one (into `ids`) after its last non-space token. -> (flags, appended)."""
    flags = [False] * len(ids)
    inserts = []
    for start, end in spans:
        inside = [i for i, (s, _) in enumerate(offsets) if start <= s < end]
        eos_at = next((i for i in inside if ids[i] == eos_id), None)
        if eos_at is None:
            text_end = start + len(text[start:end].rstrip())
            inside = [i for i in inside if offsets[i][0] < text_end]
            if inside:
                inserts.append(inside[-1] + 1)
        else:
            inside = [i for i in inside if i <= eos_at]
        for i in inside:
            flags[i] = True
    for at in reversed(inserts):
        ids.insert(at, eos_id)
        flags.insert(at, True)
    return flags, len(inserts)


def encode_conversations(tokenizer, conversations, max_length: int,
                         train_on_prompt: bool = False) -> Encoded:
    """Render, tokenise, mark the responses, truncate at `max_length` and shift the labels."""
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no eos token: instruction tuning needs one to "
                         "teach the model where a response ends")
    rendered = [response_spans(tokenizer, c.messages) for c in conversations]
    try:
        enc = tokenizer([text for text, _ in rendered], add_special_tokens=False,
                        return_offsets_mapping=True)
    except NotImplementedError:
        raise ModelError("instruction tuning needs a fast (tokenizers-backed) tokenizer to "
                         "locate the responses") from None
    out = Encoded([], [], [], 0, [], 0, 0)
    for conversation, (text, spans), ids, offsets in zip(conversations, rendered,
                                                          enc["input_ids"],
                                                          enc["offset_mapping"]):
        ids = list(ids)
        response, appended = mark_responses(ids, offsets, text, spans, tokenizer.eos_token_id)
        if len(ids) > max_length:
            if not any(response[:max_length]):
                first = response.index(True) if any(response) else len(ids)
                out.dropped.append(conversation.problem(
                    f"response cut off (it starts at token {first}; model.max_length is "
                    f"{max_length})"))
                continue
            ids, response = ids[:max_length], response[:max_length]
            out.truncated += 1
        counts = [True] * len(ids) if train_on_prompt else response
        out.input_ids.append(ids)
        out.labels.append([ids[t + 1] if counts[t + 1] else IGNORE for t in range(len(ids) - 1)]
                          + [IGNORE])
        out.sources.append(conversation.source)
        out.eos_appended += appended
        out.responses += len(spans)
    return out


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest; `logits_to_keep` asks the model for logits only from the
    first position that has a label (prompt positions need no vocabulary projection)."""
    width = max(len(data.input_ids[i]) for i in indices)
    n = len(indices)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    first = width - 1
    for row, i in enumerate(indices):
        ids, targets = data.input_ids[i], data.labels[i]
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
        labels[row, :len(targets)] = torch.tensor(targets)
        first = min(first, next((t for t, y in enumerate(targets) if y != IGNORE), first))
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "logits_to_keep": torch.arange(first, width)}


def selected(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits and (N,) targets of the positions that count. Logits may cover only the
    last positions (logits_to_keep); they are picked before any cast to fp32."""
    labels = batch["labels"][:, -logits.shape[1]:]  # (B, K)
    keep = labels != IGNORE
    return logits[keep], labels[keep]


class InstructionMetrics:
    """Loss per response token, perplexity and next-token accuracy, summed batch by batch."""

    def __init__(self):
        self.sums = torch.zeros(3, dtype=torch.double)  # loss, tokens, correct

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        picked, targets = selected(logits, batch)
        loss = F.cross_entropy(picked.float(), targets, reduction="sum")
        correct = (picked.argmax(-1) == targets).sum()
        self.sums += torch.tensor([loss.item(), targets.numel(), correct.item()],
                                  dtype=torch.double)

    def compute(self) -> dict[str, float]:
        loss_sum, tokens, correct = self.sums.tolist()
        loss = loss_sum / tokens if tokens else float("nan")
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
                "accuracy": correct / tokens if tokens else float("nan"), "tokens": tokens}

    def state(self) -> torch.Tensor:
        return self.sums.clone()

    def load_state(self, state: torch.Tensor) -> None:
        self.sums = state.double().clone()

    def report(self) -> str:
        m = self.compute()
        return (f"loss        {m['loss']:.4f}  (mean over {int(m['tokens']):,} response "
                f"tokens)\nperplexity  {m['perplexity']:.3f}\n"
                f"accuracy    {m['accuracy']:.4f}  (greedy next token)")

    def save_artifacts(self, folder: Path, name: str, title: str) -> dict:
        return {}


@register_task
class InstructionTask(Task):
    name = "instruction"
    summary = "instruction tuning of a causal LM on Alpaca, chat or ShareGPT conversations"
    settings_class = InstructionSettings
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    metrics = ("loss", "perplexity", "accuracy")
    has_labels = False

    def load_data(self):
        from tunelab.data.instructions import load_instruction_data

        return load_instruction_data(self.config.data, self.settings)

    def format_preflight(self, data) -> str:
        from tunelab.data.instructions import format_preflight

        return format_preflight(data)

    def build_model(self, labels: list[str]) -> BuiltModel:
        """The pretrained causal LM as is (its LM head is the task head) and its tokenizer,
        carrying the chosen chat template so that the saved run renders prompts the same."""
        from transformers import AutoModelForCausalLM

        from tunelab import models

        name = self.config.model.name
        family = models.model_family(models.load_config(name))
        if family != "decoder":
            raise ConfigError(f"instruction tuning needs a decoder (causal LM) such as smollm2; "
                              f"{name} is an {family} model")
        built = load_with_head(AutoModelForCausalLM, name, self.config.train.seed)
        if built.tokenizer.eos_token_id is None:
            raise ModelError(f"the tokenizer of {name} has no eos token: instruction tuning "
                             f"needs one to teach the model where a response ends")
        built.tokenizer.chat_template = chat_template(built.tokenizer, self.settings.template)
        return built

    def encode(self, tokenizer, examples) -> Encoded:
        enc = encode_conversations(tokenizer, examples, self.config.model.max_length,
                                   self.settings.train_on_prompt)
        if enc.dropped:
            first = enc.dropped[0]
            print(f"dropped {len(enc.dropped)} of {len(examples)} conversations: no response "
                  f"token fits in model.max_length={self.config.model.max_length} "
                  f"(first: {first.where()}: {first.reason})", file=sys.stderr)
        return enc

    def collate(self, data: Encoded, indices: list[int], pad_id: int) -> dict:
        return collate(data, indices, pad_id)

    def loss_sum(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the response tokens, in fp32 on those positions only."""
        picked, targets = selected(logits, batch)
        return F.cross_entropy(picked.float(), targets, reduction="sum"), int(targets.numel())

    def new_metrics(self, labels: list[str]) -> InstructionMetrics:
        return InstructionMetrics()

    def load_predictor(self, run_dir, **kwargs):
        from tunelab.generate import Generator

        return Generator.from_run(run_dir, **kwargs)

    def show_example(self, tokenizer, data: Encoded, index: int) -> str:
        return show_example(tokenizer, data, index)


def show_example(tokenizer, data: Encoded, index: int, max_chars: int = 4000) -> str:
    """The example as the model reads it, the tokens that count in the loss between « »."""
    ids, labels = data.input_ids[index], data.labels[index]
    counts = [False] + [y != IGNORE for y in labels[:-1]]  # token t is the target at t - 1
    pieces, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or counts[t] != counts[start]:
            text = tokenizer.decode(ids[start:t], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            pieces.append(f"«{text}»" if counts[start] else text)
            start = t
    shown = "".join(pieces)
    if len(shown) > max_chars:
        cut = len(shown) - max_chars
        shown = (f"{shown[:max_chars // 2]}\n[... {cut:,} characters not shown ...]\n"
                 f"{shown[-max_chars // 2:]}")
    eos = (f"the template writes eos {tokenizer.eos_token!r} after every response"
           if not data.eos_appended else
           f"the template does not write eos {tokenizer.eos_token!r} after a response: "
           f"appended to {data.eos_appended} of {data.responses} responses")
    return (f"{len(ids)} tokens, {sum(counts)} in the loss (between « »); template: "
            f"{describe_template(tokenizer)}; {eos}; {data.truncated} of {len(data)} "
            f"conversations cut at max_length, {len(data.dropped)} dropped\n"
            + "\n".join("  " + line for line in shown.split("\n")))
