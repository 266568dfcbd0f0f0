"""Generation over HTTP: /v1/generate and an OpenAI-compatible /v1/chat/completions.

    POST /v1/generate          {"model"?, "prompts": [...] | "messages": [[{role, content}...]],
                                "max_new_tokens"?, "temperature"?, "top_p"?, "seed"?}
                               -> per prompt: text, finished, prompt_tokens, new_tokens
    POST /v1/chat/completions  OpenAI's chat.completions request and answer (a subset);
                               "stream": true answers with Server-Sent Events

An instruction run reads every prompt through its chat template, as `tunelab generate` does, so
greedy answers are the same. A causal_lm run continues a prompt as plain text, as `tunelab
predict` does, and reads message lists only with its tokenizer's own chat template.

Generation takes seconds where a classification takes milliseconds, and batching prompts of
different requests would hold every client until the longest answer ends: it does not go
through the micro-batcher. It runs in one worker thread, one request at a time (`GenerationLane`);
--generation-queue requests may be held at once, the running one included, and one more gets
503 at once. A streamed reply whose client goes away stops at its next token.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from transformers import AsyncTextIteratorStreamer

from tunelab.errors import TunelabError
from tunelab.generate import Generation
from tunelab.serve.api import (ERRORS, ApiError, check_chars, check_count, check_texts,
                               overloaded, resolve)
from tunelab.serve.batcher import QueueFull
from tunelab.serve.pool import ModelPool, Served
from tunelab.tasks.instruction import render

DEFAULT_NEW_TOKENS = 256
"""New tokens of a request that names no limit (or less, if --max-new-tokens is lower)."""


# --------------------------------------------------------------------------------------------
# request and response bodies


class TextPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    """One chat turn. Other OpenAI fields (name, ...) are ignored."""

    role: str = Field(description="system (or developer), user or assistant")
    content: str | list[TextPart] | None = Field(
        None, description="text, or OpenAI content parts of type text")

    def turn(self) -> dict:
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name
        content = self.content
        if isinstance(content, list):
            content = [p.model_dump() for p in content]
        return {"role": role, "content": content}

    def chars(self) -> int:
        if isinstance(self.content, list):
            return sum(len(p.text or "") for p in self.content)
        return len(self.content or "")


class GenerateRequest(BaseModel):
    model: str | None = Field(None, description="served model name; optional if only one "
                              "served model generates")
    prompts: list[str] | None = Field(
        None, description="texts: an instruction run reads each through its chat template, a "
        "causal_lm run continues it")
    messages: list[list[Message]] | None = Field(
        None, description="conversations, each ending with a user turn; one reply each")
    max_new_tokens: int | None = Field(
        None, ge=1, description=f"default {DEFAULT_NEW_TOKENS} (at most --max-new-tokens)")
    temperature: float = Field(0.0, ge=0, description="0: greedy, the same answer every time")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (temperature > 0)")
    seed: int | None = Field(None, description="makes a sampled answer reproducible")


class Generated(BaseModel):
    text: str
    finished: bool = Field(description="stopped at end-of-text; false: cut at max_new_tokens")
    prompt_tokens: int
    new_tokens: int = Field(description="tokens generated, end-of-text included")


class GenerateResponse(BaseModel):
    model: str
    generations: list[Generated]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel, extra="allow"):
    """OpenAI's request. Unknown fields are ignored, as OpenAI clients expect; the fields in
    `UNSUPPORTED` are refused unless they ask for nothing."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description=f"default {DEFAULT_NEW_TOKENS}")
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    temperature: float = Field(1.0, ge=0, le=2, description="OpenAI's default 1 samples; "
                               "0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, description="choices per request: only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None


UNSUPPORTED = {"tools": ([],), "functions": ([],), "tool_choice": ("none",),
               "function_call": ("none",), "logprobs": (False,), "top_logprobs": (0,),
               "stop": ("", []), "presence_penalty": (0,), "frequency_penalty": (0,),
               "logit_bias": ({},), "response_format": ({"type": "text"},)}
"""OpenAI fields this server cannot honour -> the values that ask for nothing (as null does)."""


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


# --------------------------------------------------------------------------------------------
# generation, in the lane's worker thread


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None


class TooLong(Exception):
    """A prompt and the new tokens asked for do not fit the model's context (-> 413)."""


class Stopped(Exception):
    """Raised into generate() by the streamer: the client went away."""


def generate(served: Served, prompts: list, sampling: Sampling, fields: list[str],
             streamer=None) -> list[Generation]:
    """One Generation per prompt; the prompts are all texts or all message lists. `fields`
    name them in errors."""
    if served.task == "causal_lm" and isinstance(prompts[0], str):
        if sampling.temperature > 0 and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        return [continue_text(served.predictor, p, sampling, f, streamer)
                for p, f in zip(prompts, fields)]
    chat = served.chat
    for prompt, field in zip(prompts, fields):
        text = render(chat.tokenizer, chat.messages(prompt), generation_prompt=True)
        fits(chat.model, len(chat.tokenizer(text, add_special_tokens=False)["input_ids"]),
             sampling.max_new_tokens, field)
    return chat.generate(prompts, sampling.max_new_tokens, sampling.temperature,
                         sampling.top_p, seed=sampling.seed, streamer=streamer)


def continue_text(lm, prompt: str, sampling: Sampling, field: str,
                  streamer=None) -> Generation:
    """`LMPredictor.generate` for one prompt (the same truncation to model.max_length, the
    same end-of-text token), with sampling, token counts and streaming."""
    from transformers import GenerationConfig

    from tunelab.train.evaluate import autocast

    eos = lm.task.separator_id(lm.tokenizer)
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = ids[-(lm.max_length - 1):] or [eos]  # an empty prompt starts a document
    fits(lm.model, len(ids), sampling.max_new_tokens, field)
    sample = sampling.temperature > 0
    options = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=sample,
                               temperature=sampling.temperature if sample else None,
                               top_p=sampling.top_p if sample else None, eos_token_id=eos,
                               pad_token_id=lm.tokenizer.pad_token_id)
    inputs = torch.tensor([ids], device=lm.device)  # (1, T)
    with torch.inference_mode(), autocast(lm.device.type, lm.bf16):
        output = lm.model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                   generation_config=options, streamer=streamer)
    new = output[0, len(ids):].tolist()
    end = new.index(eos) if eos in new else None
    return Generation(lm.tokenizer.decode(new[:end], skip_special_tokens=True), end is not None,
                      len(ids), len(new) if end is None else end + 1)


def fits(model, prompt_tokens: int, new_tokens: int, field: str) -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + new_tokens > context:
        raise TooLong(f"{field} is {prompt_tokens} tokens; with {new_tokens} new tokens that "
                      f"is more than the model's context of {context} tokens: shorten it or "
                      "ask for fewer new tokens")


class ChunkStreamer(AsyncTextIteratorStreamer):
    """Decoded text for the event loop as generation makes it. `started` is set once
    generation begins (the prompt passed its checks); `cancel()` stops the generation at its
    next token, because nobody reads any more."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.started = asyncio.Event()
        self.cancelled = False

    def put(self, value):
        if self.cancelled:
            raise Stopped
        if self.next_tokens_are_prompt:  # generate() hands over the prompt first
            self.loop.call_soon_threadsafe(self.started.set)
        super().put(value)

    def close(self) -> None:
        """End the stream for the reader, also when generation failed before its end."""
        self.on_finalized_text("", stream_end=True)

    def cancel(self) -> None:
        self.cancelled = True


def streamed(served: Served, prompts: list, sampling: Sampling, fields: list[str],
             streamer: ChunkStreamer) -> list[Generation]:
    try:
        return generate(served, prompts, sampling, fields, streamer)
    finally:
        streamer.close()


class GenerationLane:
    """Generation requests, one at a time, in one worker thread. One at a time because on a
    CPU two generations only share the same cores, and because torch's random state is
    process-wide: a `seed` reproduces a sample only when no other generation draws in between.
    At most `size` requests are held (waiting or running); `submit` refuses one more. The
    thread ends when the lane falls idle (the next request starts another): while it lives,
    torch's OpenMP pool for it slows the batcher's (`serve.threads`)."""

    def __init__(self, size: int):
        self.size = size
        self.held = 0  # changed on the event loop only
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tunelab-generate")
        self._gate = threading.Event()
        self._gate.set()

    def submit(self, fn, *args) -> asyncio.Future:
        """Run fn(*args) in the worker; cancelling the returned future before it starts
        drops the job. Raises QueueFull when `size` requests are held."""
        if self.held >= self.size:
            raise QueueFull
        loop = asyncio.get_running_loop()
        job = self._executor.submit(fn, *args)
        self.held += 1
        job.add_done_callback(lambda _: _on_loop(loop, self._release))
        future = asyncio.wrap_future(job)
        # a stream whose client went away leaves its failure (Stopped) unread: read it here
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def _release(self) -> None:
        self.held -= 1
        if self.held == 0 and self._gate.is_set():
            # idle: let the thread go, and the OpenMP pool torch made for it (serve.threads)
            idle, self._executor = self._executor, ThreadPoolExecutor(
                1, thread_name_prefix="tunelab-generate")
            idle.shutdown(wait=False)

    def pause(self) -> None:
        """Hold back every job submitted from now on until resume() (tests fill the lane)."""
        self._gate.clear()
        self._executor.submit(self._gate.wait)

    def resume(self) -> None:
        self._gate.set()

    def close(self) -> None:
        self._gate.set()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _on_loop(loop: asyncio.AbstractEventLoop, fn) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the event loop is closed: nobody counts any more
        pass


# --------------------------------------------------------------------------------------------
# the routes


def generation_routes(pool: ModelPool, settings, lane: GenerationLane, metrics) -> APIRouter:
    """`settings`: the ServeSettings; `metrics`: the app's Metrics."""
    router = APIRouter(tags=["generation"])

    def submit(fn, *args) -> asyncio.Future:
        try:
            return lane.submit(fn, *args)
        except QueueFull:
            raise overloaded("generation queue", settings.generation_queue,
                             "held, --generation-queue") from None

    def count(served: Served, results: list[Generation]) -> None:
        metrics.generated.labels(served.name).inc(sum(r.new_tokens for r in results))

    @router.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate_texts(body: GenerateRequest, request: Request):
        served = resolve(pool, body.model, "/v1/generate", request)
        prompts, fields = read_prompts(body, served, settings)
        sampling = Sampling(new_tokens(body.max_new_tokens, "max_new_tokens", settings),
                            body.temperature, body.top_p, body.seed)
        job = submit(generate, served, prompts, sampling, fields)
        try:
            results = await job
        except Exception as e:
            raise failure(e) from None
        count(served, results)
        return {"model": served.name, "generations": [dataclasses.asdict(r) for r in results]}

    @router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
    async def chat_completions(body: ChatRequest, request: Request):
        served = resolve(pool, body.model, "/v1/chat/completions", request)
        refuse_unsupported(body)
        turns = read_conversation(body.messages, "messages", served, settings)
        sampling = Sampling(new_tokens(body.max_completion_tokens or body.max_tokens,
                                       "max_tokens", settings),
                            body.temperature, body.top_p, body.seed)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                 "model": served.name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return await stream(served, turns, sampling, reply, usage)
        job = submit(generate, served, [turns], sampling, ["messages"])
        try:
            [result] = await job
        except Exception as e:
            raise failure(e) from None
        count(served, [result])
        return {**reply, "object": "chat.completion", "usage": usage_of(result), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": result.text},
             "finish_reason": finish_reason(result)}]}

    async def stream(served: Served, turns: list[dict], sampling: Sampling, reply: dict,
                     usage: bool) -> StreamingResponse:
        """Waits for generation to begin, so that a refused prompt is still a plain 4xx."""
        streamer = ChunkStreamer(served.chat.tokenizer)
        job = submit(streamed, served, [turns], sampling, ["messages"], streamer)
        started = asyncio.ensure_future(streamer.started.wait())
        try:
            await asyncio.wait([started, job], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the client went away while waiting
            streamer.cancel()
            job.cancel()
            raise
        finally:
            started.cancel()
        if job.done() and job.exception() is not None:
            raise failure(job.exception())
        return StreamingResponse(events(served, streamer, job, reply, usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def events(served: Served, streamer: ChunkStreamer, job: asyncio.Future,
                     reply: dict, usage: bool):
        def chunk(delta: dict, finish: str | None = None) -> str:
            return sse({**reply, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for text in streamer:
                if text:
                    yield chunk({"content": text})
            try:
                [result] = await job
            except Exception as e:  # the status (200) is sent: the error goes in the stream
                error = failure(e)
                metrics.errors.labels(error.kind).inc()
                yield sse({"error": {"type": error.kind, "message": error.message}})
                return
            count(served, [result])
            yield chunk({}, finish_reason(result))
            if usage:
                yield sse({**reply, "object": "chat.completion.chunk", "choices": [],
                           "usage": usage_of(result)})
            yield "data: [DONE]\n\n"
        finally:
            streamer.cancel()  # a no-op after the end; else generation stops at its next token

    return router


def read_prompts(body: GenerateRequest, served: Served, limits) -> tuple[list, list[str]]:
    """The request's prompts (texts or message lists) and their names for errors."""
    if (body.prompts is None) == (body.messages is None):
        raise ApiError(422, "invalid_request", "give \"prompts\" (texts) or \"messages\" "
                       "(conversations): exactly one of them")
    if body.prompts is not None:
        check_texts(body.prompts, None, limits, "prompts")
        return body.prompts, [f"prompts[{i}]" for i in range(len(body.prompts))]
    if not body.messages:
        raise ApiError(422, "invalid_request", "messages is empty: give at least one")
    check_count(len(body.messages), "messages", limits)
    fields = [f"messages[{i}]" for i in range(len(body.messages))]
    return [read_conversation(m, f, served, limits) for m, f in zip(body.messages, fields)], fields


def read_conversation(messages: list[Message], field: str, served: Served,
                      limits) -> list[dict]:
    """Checked here, on the event loop, so that a bad conversation is a 4xx before it waits
    for the generation worker (the check is plain Python: no tokenizer, no model)."""
    if served.chat is None:
        raise ApiError(400, "wrong_task", f"model {served.name!r} is a causal_lm run whose "
                       "tokenizer has no chat template, so it cannot read messages: send "
                       "\"prompts\" to /v1/generate (continued as plain text)")
    for i, message in enumerate(messages):
        check_chars(message.chars(), f"{field}[{i}].content", limits)
    turns = [m.turn() for m in messages]
    try:
        served.chat.messages(turns)
    except TunelabError as e:
        raise ApiError(422, "invalid_request", f"{field}: {e}") from None
    return turns


def refuse_unsupported(body: ChatRequest) -> None:
    if body.n != 1:
        raise ApiError(400, "unsupported", f"n={body.n}: tunelab serve makes one choice per "
                       f"request; send {body.n} requests (with different seeds) instead")
    extra = body.model_extra or {}
    for field, harmless in UNSUPPORTED.items():
        value = extra.get(field)
        if value is not None and value not in harmless:
            raise ApiError(400, "unsupported", f"{field} is not supported by tunelab serve "
                           f"(got {json.dumps(value)[:80]}); leave it out")


def new_tokens(asked: int | None, field: str, limits) -> int:
    if asked is None:
        return min(DEFAULT_NEW_TOKENS, limits.max_new_tokens)
    if asked > limits.max_new_tokens:
        raise ApiError(422, "invalid_request", f"{field} is {asked}; this server generates at "
                       f"most {limits.max_new_tokens} new tokens (--max-new-tokens)")
    return asked


def failure(e: Exception) -> ApiError:
    if isinstance(e, TooLong):
        return ApiError(413, "too_large", str(e))
    if isinstance(e, TunelabError):  # a prompt the generator refused
        return ApiError(422, "invalid_request", str(e))
    return ApiError(500, "inference", f"{type(e).__name__}: {e}")


def finish_reason(result: Generation) -> str:
    return "stop" if result.finished else "length"


def usage_of(result: Generation) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.new_tokens,
            "total_tokens": result.prompt_tokens + result.new_tokens}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
