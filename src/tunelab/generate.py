"""Generate text with an instruction-tuned run or a plain causal LM: the engine behind
`tunelab generate`, `tunelab chat`, and `eval`/`predict` on instruction runs.

    >>> import tunelab
    >>> gen = tunelab.load("runs/smollm2-alpaca")          # or Generator.from_pretrained("smollm2")
    >>> out = gen.generate(["Name three primary colours."], max_new_tokens=64)
    >>> out[0].text, out[0].finished                        # finished: stopped at eos
    ('Red, yellow and blue.', True)

Prompts are rendered with the run's chat template (saved with its tokenizer), so the model
sees them exactly as in training. Several prompts are generated in left-padded batches;
temperature 0 is greedy decoding. Generation stops at the tokenizer's eos token or at any eos
the model's generation config names.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab import runs
from tunelab.errors import TunelabError
from tunelab.tasks.instruction import render

BANNER = "chat with {name}: /reset clears the history, /exit (or Ctrl-D) quits"


@dataclass
class Generation:
    text: str
    finished: bool
    """Stopped at an eos token; False when it hit max_new_tokens first."""
    prompt_tokens: int
    new_tokens: int
    """Generated tokens, the eos included."""


class Generator:
    def __init__(self, model, tokenizer, config, bf16: bool = False, batch_size: int = 8,
                 max_new_tokens: int = 256, name: str = ""):
        """`config`: an instruction RunConfig (template, system prompt, field names and
        model.max_length, which bounds evaluation inputs)."""
        from tunelab.tasks import get_task
        from tunelab.tasks.instruction import chat_template

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.task = get_task(config)
        self.settings = config.task.settings
        self.bf16 = bf16
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.name = name or config.model.name
        self.device = next(model.parameters()).device
        tokenizer.chat_template = chat_template(tokenizer, self.settings.template)
        extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
        self.stop_ids = list(dict.fromkeys([tokenizer.eos_token_id, *extra]))
        self.run_dir: Path | None = None

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir, precision: str = "auto", batch_size: int = 8,
                 max_new_tokens: int = 256, merge: bool = True) -> "Generator":
        """An instruction run: model/ as saved, or the base + method + adapter/ weights.
        precision: auto (what the run trained with), bf16 or fp32; merge: as
        `Predictor.from_run`."""
        from tunelab.predict import load_run_model, run_uses_bf16

        run_dir = Path(run_dir)
        config, env, labels = runs.read_run(run_dir)
        if config.task.name != "instruction":
            raise TunelabError(f"{run_dir} is a {config.task.name} run; generation needs an "
                               f"instruction run or a causal LM model name")
        device = _device()
        bf16 = run_uses_bf16(env, precision, device.type)
        model, tokenizer = load_run_model(run_dir, config, labels, env, merge, bf16)
        generator = cls(model.to(device), tokenizer, config, bf16, batch_size, max_new_tokens,
                        name=str(run_dir))
        generator.run_dir = run_dir
        return generator

    @classmethod
    def from_pretrained(cls, name: str, template: str = "auto", system_prompt: str | None = None,
                        max_length: int = 1024, precision: str = "auto", batch_size: int = 8,
                        max_new_tokens: int = 256) -> "Generator":
        """A plain causal LM (alias such as smollm2, folder or hub id), e.g. the base model of
        a run to compare with; loaded exactly as training loads it."""
        from tunelab.config import resolve_config
        from tunelab.tasks import get_task
        from tunelab.train.evaluate import resolve_precision

        config = resolve_config(tree={
            "task": {"name": "instruction", "template": template, "system_prompt": system_prompt},
            "model": {"name": name, "max_length": max_length}, "train": {"precision": precision}})
        from tunelab.predict import keep_weights_cast

        built = get_task(config).build_model([])
        device = _device()
        bf16 = resolve_precision(precision, device.type) == "bf16"
        model = keep_weights_cast(built.model) if bf16 else built.model
        return cls(model.to(device), built.tokenizer, config, bf16, batch_size, max_new_tokens,
                   name=name)

    # -- generation ---------------------------------------------------------------------------
    def messages(self, prompt, system: str | None = None) -> list[dict]:
        """A prompt (text, or a list of {role, content} ending with a user turn) as messages,
        with `system` (else the run's system prompt) first when it has no system message."""
        from tunelab.data.instructions import RecordError, check_order, parse_turns

        try:
            messages = check_order([{"role": "user", "content": prompt}] if isinstance(
                prompt, str) else parse_turns(prompt), prompt_only=True)
        except RecordError as e:
            raise TunelabError(f"bad prompt: {e.reason}") from None
        system = system or self.settings.system_prompt
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def generate(self, prompts: list, max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, system: str | None = None,
                 seed: int | None = 0, streamer=None, progress: bool = False) -> list[Generation]:
        """One Generation per prompt, in order. Prompts are texts or message lists; they run
        in batches of `batch_size`, longest first. temperature 0: greedy; else sampling with
        nucleus `top_p`, seeded with `seed` (None: continue the current random state).
        `streamer` (one prompt only) receives the tokens as they are made."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            raise TypeError("generate takes a list of prompts; wrap a single one in a list")
        if not prompts:
            return []
        if streamer is not None and len(prompts) != 1:
            raise ValueError("streaming works on one prompt at a time")
        if temperature < 0 or not 0 < top_p <= 1 or (max_new_tokens or 1) < 1:
            raise TunelabError(f"generation needs temperature >= 0, 0 < top_p <= 1 and "
                               f"max_new_tokens >= 1; got {temperature}, {top_p}, "
                               f"{max_new_tokens}")
        texts = [render(self.tokenizer, self.messages(p, system), generation_prompt=True)
                 for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        options = self._options(max_new_tokens or self.max_new_tokens, temperature, top_p)
        if temperature > 0 and seed is not None:
            torch.manual_seed(seed)
        from tqdm.auto import tqdm

        out: list[Generation | None] = [None] * len(ids)
        with tqdm(total=len(ids), unit="prompt", desc="generate", disable=not progress,
                  mininterval=1.0) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for i, result in zip(chunk, self._batch([ids[i] for i in chunk], options,
                                                        streamer)):
                    out[i] = result
                bar.update(len(chunk))
        return out

    def _options(self, max_new_tokens: int, temperature: float, top_p: float):
        from transformers import GenerationConfig

        sample = temperature > 0
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                                temperature=temperature if sample else None,
                                top_p=top_p if sample else None, eos_token_id=self.stop_ids,
                                pad_token_id=self.tokenizer.pad_token_id)

    def _batch(self, prompts: list[list[int]], options, streamer) -> list[Generation]:
        """Left-padded so that every prompt ends where generation starts."""
        from tunelab.train.evaluate import autocast

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id,
                               dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(input_ids)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode(), autocast(self.device.type, self.bf16):
            output = self.model.generate(input_ids=input_ids.to(self.device),
                                         attention_mask=mask.to(self.device),
                                         generation_config=options, streamer=streamer)
        results = []
        for p, new in zip(prompts, output[:, width:].tolist()):
            end = next((t for t, token in enumerate(new) if token in self.stop_ids), None)
            kept = new if end is None else new[:end]
            results.append(Generation(
                self.tokenizer.decode(kept, skip_special_tokens=True), end is not None,
                len(p), len(new) if end is None else end + 1))
        return results

    # -- chat ---------------------------------------------------------------------------------
    def chat(self, input=None, output=None, max_new_tokens: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, system: str | None = None,
             seed: int = 0) -> None:
        """A conversation on `input`/`output` (stdin/stdout) that keeps its history. On a
        terminal the reply streams token by token; piped, each reply is written whole."""
        input, output = input or sys.stdin, output or sys.stdout
        torch.manual_seed(seed)  # once: sampled replies differ from turn to turn
        interactive = input.isatty() and output.isatty()
        limit = max_new_tokens or self.max_new_tokens
        history: list[dict] = []
        if interactive:
            output.write(BANNER.format(name=self.name) + "\n")
        while True:
            if interactive:
                output.write("\n> ")
                output.flush()
            line = input.readline()
            if not line or line.strip() == "/exit":
                break
            text = line.strip()
            if text == "/reset":
                history = []
                output.write("(history cleared)\n")
                continue
            if not text:
                continue
            history.append({"role": "user", "content": text})
            history = self._fit(history, system, limit)
            streamer = _streamer(self.tokenizer, output) if interactive else None
            reply = self.generate([history], limit, temperature, top_p, system, seed=None,
                                  streamer=streamer)[0]
            if not interactive:
                output.write(reply.text + "\n")
            if not reply.finished:
                output.write(f"[cut at {limit} new tokens]\n")
            output.flush()
            history.append({"role": "assistant", "content": reply.text})

    def _fit(self, history: list[dict], system: str | None, max_new_tokens: int) -> list[dict]:
        """Drop the oldest exchanges until the prompt and the reply fit the model's context."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is None:
            return history
        while len(history) > 1:
            text = render(self.tokenizer, self.messages(history, system), generation_prompt=True)
            if len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + \
                    max_new_tokens <= context:
                break
            history = history[2:]
        return history

    # -- files (tunelab eval / predict) -------------------------------------------------------
    def evaluate(self, conversations):
        """(metrics, the Metrics object, conversations dropped because no response token
        fits model.max_length) on data.instructions Conversations."""
        from tunelab.tasks.instruction import encode_conversations
        from tunelab.train.evaluate import evaluate

        data = encode_conversations(self.tokenizer, conversations, self.config.model.max_length,
                                    self.settings.train_on_prompt)
        if not len(data):
            raise TunelabError(f"all {len(conversations)} conversations were dropped: no "
                               f"response fits in model.max_length="
                               f"{self.config.model.max_length}")
        metrics, tracker = evaluate(self.task, self.model, data, [], self.batch_size,
                                    self.tokenizer.pad_token_id, self.device, self.bf16)
        return metrics, tracker, data.dropped

    def evaluate_file(self, path: str, format: str = "auto"):
        """(metrics, Metrics object, dropped records) on an instruction file (`tunelab eval`):
        loss and perplexity per response token, next-token accuracy."""
        from tunelab.data.instructions import read_file

        conversations, problems = read_file(str(path), self.settings, format)
        metrics, tracker, dropped = self.evaluate(conversations)
        return metrics, tracker, problems + dropped

    def predict_file(self, path: str, format: str = "auto") -> list[dict]:
        """Every record with `generated`, `finished` and `new_tokens` added (`tunelab
        predict`); the prompt is the record without its reference response."""
        from tunelab.data.instructions import read_prompts

        rows, prompts = read_prompts(str(path), self.settings, format)
        results = self.generate(prompts, progress=True)
        return [{**row, "generated": r.text, "finished": r.finished, "new_tokens": r.new_tokens}
                for row, r in zip(rows, results)]


def load_generator(target: str, precision: str = "auto", **kwargs) -> Generator:
    """A run directory (instruction run) or a model name/folder (its base, for comparison)."""
    if runs.is_run_dir(target):
        return Generator.from_run(target, precision=precision, **kwargs)
    return Generator.from_pretrained(target, precision=precision, **kwargs)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _streamer(tokenizer, stream):
    """A TextStreamer that writes the reply to `stream` as tokens come (it prints to stdout)."""
    from transformers import TextStreamer

    class Printer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return Printer(tokenizer, skip_prompt=True, skip_special_tokens=True)
