"""The HTTP API: FastAPI over the model pool, the micro-batcher and the generation lane.

    POST /v1/classify   classification runs: {"model"?, "texts": [...], "text_pairs"?: [...]}
                        -> per text: label, score, scores
    POST /v1/explain    classification runs: {"model"?, "texts", "text_pairs"?, "label"?,
                        "method"?: "ig"|"gxi", "steps"?} -> per text: words and attributions
    POST /v1/tag        token_classification runs: {"model"?, "texts": [...]}
                        -> per text: entities {type, text, start, end, score} (char offsets)
    POST /v1/generate   instruction and causal_lm runs: {"model"?, "prompts" | "messages",
                        "max_new_tokens"?, "temperature"?, "top_p"?, "seed"?}
                        -> per prompt: text, finished, prompt_tokens, new_tokens
    POST /v1/chat/completions
                        OpenAI-compatible chat (a subset; "stream": true for Server-Sent Events)
    GET  /v1/models     what is served: name, task, endpoints, base, method, labels, parameters
    POST /v1/models     {"name", "run_dir"}: serve one more run (shares its base if loaded)
    GET  /health        liveness: no key needed
    GET  /metrics       Prometheus text: requests, latency, batch sizes, queue depths,
                        generated tokens, errors

Every answer comes from the engine behind `tunelab predict` / `tunelab generate` for the run's
task; an onnx/int8 export folder is served by ONNX Runtime, the engine behind
`tunelab predict EXPORT_DIR` (/v1/classify only). A model asked at an endpoint of another
task gets a 400 naming its task and endpoints. Classification and tagging go through the
micro-batcher (a task's runner in `RUNNERS`); generation runs beside it (generation.py). A new
task adds its endpoints to pool.TASK_ENDPOINTS, its route here (or in a module of its own)
and, if it batches, a runner. Errors are JSON `{"error": {"type", "message"}}`.
"""
from __future__ import annotations

import hmac
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from pydantic import BaseModel, Field
from starlette.datastructures import Headers

import tunelab
from tunelab.errors import ConfigError, TunelabError
from tunelab.explain import explain
from tunelab.serve.api import ERRORS, ApiError, check_texts, overloaded, resolve
from tunelab.serve.batcher import Batcher, QueueFull
from tunelab.serve.generation import GenerationLane, generation_routes
from tunelab.serve.pool import ModelPool
from tunelab.serve.threads import awaited_in_own_thread, in_own_thread


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    """Interface to bind; loopback unless another is asked for explicitly."""
    port: int = 8000
    api_key: str | None = None
    """When set, /v1/* and /metrics need `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    max_batch: int = 64
    """Texts per forward pass the batcher aims for."""
    max_wait_ms: float = 5.0
    """Under load, how long requests that queued while a batch ran may wait for more to join
    them (counted from the oldest). A request that finds the batcher idle never waits."""
    queue_size: int = 256
    """Requests that may wait; one more gets 503 at once."""
    max_texts: int = 256
    """Texts per request; more get 413."""
    max_chars: int = 10000
    """Characters per text (and per text pair); longer get 413."""
    precision: str = "auto"
    """auto (each run's training precision), bf16 or fp32; for runs (an onnx/int8 export
    runs as exported)."""
    threads: int = 0
    """Torch (and ONNX Runtime) threads for inference; 0 = every core this process may use."""
    max_new_tokens: int = 1024
    """Most new tokens a generation may ask for (/v1/generate max_new_tokens, chat
    max_tokens); more get 422. A request that names none gets min(256, this)."""
    generation_queue: int = 8
    """Generation requests held at once, the running one included (one generates at a time);
    one more gets 503."""

    def __post_init__(self):
        for name in ("max_batch", "queue_size", "max_texts", "max_chars", "max_new_tokens",
                     "generation_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_wait_ms < 0:
            raise ConfigError("--max-wait-ms must be >= 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError("--precision must be auto, bf16 or fp32")
        if self.threads <= 0:
            self.threads = len(os.sched_getaffinity(0))

    def max_body_bytes(self) -> int:
        """A JSON body holding max_texts texts and pairs of max_chars characters each, every
        character escaped (\\uXXXX), fits in this; anything larger is refused unread."""
        return 2 * self.max_texts * (6 * self.max_chars + 8) + 65536


# --------------------------------------------------------------------------------------------
# request and response bodies


class ClassifyRequest(BaseModel):
    model: str | None = Field(None, description="served model name; optional if only one")
    texts: list[str] = Field(description="texts to classify (at least one)")
    text_pairs: list[str] | None = Field(
        None, description="second texts for pair tasks (NLI, similarity); same length as texts")


class Prediction(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction]


MAX_EXPLAIN_STEPS = 200
"""Integrated gradients costs `steps` forward and backward passes per text: capped."""


class ExplainRequest(BaseModel):
    model: str | None = Field(None, description="served model name; optional if only one")
    texts: list[str] = Field(description="texts to explain (at least one)")
    text_pairs: list[str] | None = Field(None, description="second texts for pair tasks")
    label: str | None = Field(None, description="label to explain; default: the predicted one")
    method: Literal["ig", "gxi"] = Field(
        "ig", description="ig: integrated gradients; gxi: gradient x input (one pass, cheap)")
    steps: int = Field(50, ge=1, le=MAX_EXPLAIN_STEPS, description="integration steps (ig)")


class ExplainedText(BaseModel):
    label: str = Field(description="the label explained")
    score: float = Field(description="its probability")
    predicted: str
    words: list[str]
    scores: list[float] = Field(description="one per word: > 0 pushes toward label")
    pair_words: list[str] | None = None
    pair_scores: list[float] | None = None
    delta: float | None = Field(None, description="ig: completeness gap; near 0 = converged")


class ExplainResponse(BaseModel):
    model: str
    method: str
    explanations: list[ExplainedText]


class TagRequest(BaseModel):
    model: str | None = Field(None, description="served model name; optional if only one "
                              "served model tags")
    texts: list[str] = Field(description="raw texts to tag (at least one)")


class Entity(BaseModel):
    type: str
    text: str = Field(description="the entity as written: the text's [start:end]")
    start: int = Field(description="character offset of its first character")
    end: int = Field(description="character offset after its last character")
    score: float = Field(description="mean probability of its words' tags")


class Tagged(BaseModel):
    entities: list[Entity]


class TagResponse(BaseModel):
    model: str
    predictions: list[Tagged]


class AddModelRequest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    run_dir: str


def classify_runner(served, texts: list[str], pairs: list[str] | None) -> list[dict]:
    return served.predictor.predict(texts, pairs)


def tag_runner(served, texts: list[str], pairs: list[str] | None) -> list[dict]:
    """Entities only: the words and tags the predictor also returns are its own business."""
    return [{"entities": p["entities"]} for p in served.predictor.predict(texts)]


RUNNERS = {"classify": classify_runner, "tag": tag_runner}
"""Task -> function the batcher calls in its worker thread."""
KNOWN_PATHS = {"/v1/classify", "/v1/explain", "/v1/tag", "/v1/generate", "/v1/chat/completions",
               "/v1/models", "/health", "/metrics"}


# --------------------------------------------------------------------------------------------
# metrics


class Metrics:
    def __init__(self, depth, generation_held):
        self.registry = CollectorRegistry()  # per app: several apps may live in one process
        r = self.registry
        self.requests = Counter("tunelab_requests", "HTTP requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("tunelab_request_seconds", "Request latency by endpoint",
                                 ["endpoint"], registry=r, buckets=(
                                     .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10,
                                     30, 120))
        self.batch = Histogram("tunelab_batch_texts", "Texts per forward pass, by model",
                               ["model"], registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.errors = Counter("tunelab_errors", "Error responses by type", ["type"], registry=r)
        self.queue = Gauge("tunelab_queue_depth", "Requests waiting for the batcher", registry=r)
        self.queue.set_function(depth)
        self.generation = Gauge("tunelab_generation_held", "Generation requests waiting or "
                                "running", registry=r)
        self.generation.set_function(generation_held)
        self.generated = Counter("tunelab_generated_tokens", "Tokens generated, by model",
                                 ["model"], registry=r)


# --------------------------------------------------------------------------------------------
# the app


def create_app(pool: ModelPool, settings: ServeSettings) -> FastAPI:
    batcher = Batcher(pool.models, RUNNERS, max_batch=settings.max_batch,
                      max_wait_ms=settings.max_wait_ms, queue_size=settings.queue_size,
                      threads=settings.threads)
    lane = GenerationLane(settings.generation_queue)
    metrics = Metrics(batcher.depth, lambda: lane.held)
    batcher.on_batch = lambda model, n: metrics.batch.labels(model).observe(n)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()
        lane.close()

    app = FastAPI(title="tunelab serve", version=tunelab.__version__, lifespan=lifespan,
                  description="Predictions, entity spans and generated text from tunelab runs; "
                  "many adapters share one base. When the server has an API key, /v1/* and "
                  "/metrics need 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.")
    app.state.pool, app.state.batcher, app.state.settings = pool, batcher, settings
    app.state.metrics, app.state.lane = metrics, lane
    install_middleware(app, settings, metrics)
    install_error_handlers(app, metrics)

    async def batched(served, task: str, texts: list[str], pairs: list[str] | None) -> list:
        try:
            return await batcher.submit(served.name, task, texts, pairs)
        except QueueFull:
            raise overloaded("request queue", settings.queue_size,
                             "waiting, --queue-size") from None
        except Exception as e:  # raised by the model in the worker thread
            raise ApiError(500, "inference", f"{type(e).__name__}: {e}") from None

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
              tags=["classification"])
    async def classify(body: ClassifyRequest, request: Request):
        served = resolve(pool, body.model, "/v1/classify", request)
        check_texts(body.texts, body.text_pairs, settings)
        preds = await batched(served, "classify", body.texts, body.text_pairs)
        return {"model": served.name, "predictions": preds}

    @app.post("/v1/tag", response_model=TagResponse, responses=ERRORS,
              tags=["token classification"])
    async def tag(body: TagRequest, request: Request):
        served = resolve(pool, body.model, "/v1/tag", request)
        check_texts(body.texts, None, settings)
        return {"model": served.name,
                "predictions": await batched(served, "tag", body.texts, None)}

    @app.post("/v1/explain", response_model=ExplainResponse, responses=ERRORS,
              tags=["classification"])
    async def explain_texts(body: ExplainRequest, request: Request):
        served = resolve(pool, body.model, "/v1/explain", request)
        check_texts(body.texts, body.text_pairs, settings)
        labels = served.predictor.labels
        if body.label is not None and body.label not in labels:
            raise ApiError(422, "invalid_request", f"label {body.label!r} is not a label of "
                           f"{served.name}: " + ", ".join(labels))
        try:  # many gradient passes: on a thread beside the batcher, not through it
            found = await awaited_in_own_thread(
                lambda: explain(served.predictor, body.texts, body.text_pairs,
                                label=body.label, method=body.method, steps=body.steps))
        except Exception as e:
            raise ApiError(500, "inference", f"{type(e).__name__}: {e}") from None
        return {"model": served.name, "method": body.method, "explanations": [
            {"label": e.label, "score": e.score, "predicted": e.predicted, "words": e.words,
             "scores": e.word_scores, "pair_words": e.pair_words,
             "pair_scores": e.pair_scores, "delta": e.delta} for e in found]}

    app.include_router(generation_routes(pool, settings, lane, metrics))

    @app.get("/v1/models", tags=["models"])
    async def list_models():
        """Ours under "models"; under "data" the shape OpenAI clients list models with."""
        served = list(pool.models.values())
        return {"models": [s.describe() for s in served], "object": "list", "data": [
            {"id": s.name, "object": "model", "owned_by": "tunelab", "created": s.created}
            for s in served]}

    @app.post("/v1/models", status_code=201, responses=ERRORS, tags=["models"])
    async def add_model(body: AddModelRequest, request: Request):
        if body.name in pool.models:
            raise ApiError(409, "conflict", f"a model named {body.name!r} is already served")
        try:  # loading runs torch: keep it off the event loop
            served = await awaited_in_own_thread(pool.add, body.name, Path(body.run_dir))
        except TunelabError as e:
            raise ApiError(422, "invalid_run", str(e)) from None
        request.state.model = served.name
        return served.describe()

    @app.get("/health", tags=["service"])
    async def health():
        return {"status": "ok", "models": pool.names(), "queue_depth": batcher.depth(),
                "generation_held": lane.held}

    @app.get("/metrics", tags=["service"])
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def install_middleware(app: FastAPI, settings: ServeSettings, metrics: Metrics) -> None:
    app.add_middleware(GuardAndMeasure, settings=settings, metrics=metrics)


class GuardAndMeasure:
    """API key and body size checks before routing; request count and latency after. Plain
    ASGI: Starlette's @app.middleware("http") runs each request through extra tasks and memory
    streams, ~0.3 ms a request as measured on a busy 2-core machine, a tenth of what an int8
    export takes to answer a short sentence."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.key = settings.api_key.encode() if settings.api_key else None
        self.limit = settings.max_body_bytes()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        refusal = self.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return self.record(scope, refusal.status_code, start)

        async def send_and_record(message):
            if message["type"] == "http.response.start":  # a stream counts until its first byte
                self.record(scope, message["status"], start)
            await send(message)

        await self.app(scope, receive, send_and_record)

    def refusal(self, scope) -> JSONResponse | None:
        headers, path = Headers(scope=scope), scope["path"]
        if self.key is not None and (path.startswith("/v1/") or path == "/metrics"):
            given = headers.get("x-api-key") or ""
            auth = headers.get("authorization") or ""
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), self.key):
                return error_response(self.metrics, 401, "unauthorized", "missing or wrong API "
                                      "key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                                      {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limit:
            return error_response(self.metrics, 413, "too_large", f"request body of {length} "
                                  f"bytes is larger than --max-texts and --max-chars allow "
                                  f"({self.limit} bytes)")
        return None

    def record(self, scope, status: int, start: float) -> None:
        route = scope.get("route")  # unset when refused before routing
        path = scope["path"]
        endpoint = getattr(route, "path", None) or (
            path if path in KNOWN_PATHS else "other")  # bounded label values
        model = scope.get("state", {}).get("model", "")  # what request.state.model set
        self.metrics.requests.labels(endpoint, model, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def error_response(metrics: Metrics, status: int, kind: str, message: str,
                   headers: dict | None = None) -> JSONResponse:
    metrics.errors.labels(kind).inc()
    return JSONResponse({"error": {"type": kind, "message": message}}, status, headers)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def error(status: int, kind: str, message: str, headers=None) -> JSONResponse:
        return error_response(metrics, status, kind, message, headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error(e.status, e.kind, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = e.errors()
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in content_type:
            return error(415, "unsupported_media_type", "send the body as JSON with "
                         f"'Content-Type: application/json' (got {content_type or 'none'!r})")
        if any(p.get("type") == "json_invalid" for p in problems):
            return error(400, "invalid_json", "the request body is not valid JSON")
        message = "; ".join(f"{'.'.join(str(x) for x in p['loc'] if x != 'body') or 'body'}: "
                            f"{p['msg']}" for p in problems[:5])
        return error(422, "invalid_request", message)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        return error(500, "internal", f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------
# the command


def parse_run_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """RUN_DIR (named after its folder), EXPORT_DIR (named after its run's folder, the name
    `tunelab verify --url` asks for by default) or NAME=RUN_DIR|EXPORT_DIR."""
    from tunelab import exported

    out, seen = [], set()
    for spec in specs:
        name, _, folder = spec.partition("=")
        if not folder or Path(spec).exists():
            name, folder = Path(spec).resolve().name, spec
            if exported.is_export(folder):
                name = Path(exported.read_meta(folder)["run"]).name
        if name in seen:
            raise ConfigError(f"two runs are served as {name!r}: name one with NAME=RUN_DIR")
        seen.add(name)
        out.append((name, Path(folder)))
    return out


def serve(specs: list[str], settings: ServeSettings) -> None:
    import uvicorn

    pool = ModelPool(settings.precision, settings.max_batch, settings.threads)

    def load():  # not on the main thread, which lives on (serve.threads)
        for name, folder in parse_run_specs(specs):
            served = pool.add(name, folder, settle=False)
            how = f"{served.export} export, ONNX Runtime" if served.export else served.task
            print(f"loaded {name}: {served.method} on {served.base_model} from {folder}, "
                  f"{how} ({served.private_bytes / 2**20:.2f} MB of its own)", flush=True)
        pool.settle()

    in_own_thread(load)
    for served in pool.models.values():
        if served.folded_bytes:
            print(f"{served.name}: adapter folded into {served.folded_bytes / 2**20:.1f} MB of "
                  "bf16 weights of its own (alone on its base)", flush=True)
    app = create_app(pool, settings)
    print(f"serving {', '.join(pool.names())} on http://{settings.host}:{settings.port} "
          f"(API spec: /openapi.json, docs: /docs)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
