"""The HTTP API: FastAPI over the model pool and the micro-batcher.

    POST /v1/classify   {"model"?, "texts": [...], "text_pairs"?: [...]} -> predictions
    POST /v1/explain    {"model"?, "texts", "text_pairs"?, "label"?, "method"?: "ig"|"gxi",
                         "steps"?} -> per text: label, words and their attribution scores
    GET  /v1/models     what is served: name, base, method, labels, trainable parameters
    POST /v1/models     {"name", "run_dir"}: serve one more run (shares its base if loaded)
    GET  /health        liveness: no key needed
    GET  /metrics       Prometheus text: requests, latency, batch sizes, queue depth, errors

Served outputs come from the same Predictor engine as `tunelab predict`. A task adds its
endpoint here (request/response models + one route) and its runner to `RUNNERS`; the batcher
and the pool need no change. Errors are JSON `{"error": {"type", "message"}}`.
"""
from __future__ import annotations

import asyncio
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

import tunelab
from tunelab.errors import ConfigError, TunelabError
from tunelab.explain import explain
from tunelab.serve.batcher import Batcher, QueueFull
from tunelab.serve.pool import ModelPool


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
    """How long the batcher waits for more requests after the first one of a batch."""
    queue_size: int = 256
    """Requests that may wait; one more gets 503 at once."""
    max_texts: int = 256
    """Texts per request; more get 413."""
    max_chars: int = 10000
    """Characters per text (and per text pair); longer get 413."""
    precision: str = "auto"
    """auto (each run's training precision), bf16 or fp32."""
    threads: int = 0
    """Torch threads for inference; 0 = every core this process may use."""

    def __post_init__(self):
        for name in ("max_batch", "queue_size", "max_texts", "max_chars"):
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


class AddModelRequest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    run_dir: str


class ErrorBody(BaseModel):
    error: dict[str, str]


ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 503)}


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def classify_runner(served, texts: list[str], pairs: list[str] | None) -> list[dict]:
    return served.predictor.predict(texts, pairs)


RUNNERS = {"classify": classify_runner}
KNOWN_PATHS = {"/v1/classify", "/v1/explain", "/v1/models", "/health", "/metrics"}
"""Task -> function the batcher calls in its worker thread."""


# --------------------------------------------------------------------------------------------
# metrics


class Metrics:
    def __init__(self, depth):
        self.registry = CollectorRegistry()  # per app: several apps may live in one process
        r = self.registry
        self.requests = Counter("tunelab_requests", "HTTP requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("tunelab_request_seconds", "Request latency by endpoint",
                                 ["endpoint"], registry=r, buckets=(
                                     .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.batch = Histogram("tunelab_batch_texts", "Texts per forward pass, by model",
                               ["model"], registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.errors = Counter("tunelab_errors", "Error responses by type", ["type"], registry=r)
        self.queue = Gauge("tunelab_queue_depth", "Requests waiting for the batcher", registry=r)
        self.queue.set_function(depth)


# --------------------------------------------------------------------------------------------
# the app


def create_app(pool: ModelPool, settings: ServeSettings) -> FastAPI:
    batcher = Batcher(pool.models, RUNNERS, max_batch=settings.max_batch,
                      max_wait_ms=settings.max_wait_ms, queue_size=settings.queue_size,
                      threads=settings.threads)
    metrics = Metrics(batcher.depth)
    batcher.on_batch = lambda model, n: metrics.batch.labels(model).observe(n)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="tunelab serve", version=tunelab.__version__, lifespan=lifespan,
                  description="Predictions from tunelab runs; many adapters share one base. "
                  "When the server has an API key, /v1/* and /metrics need "
                  "'Authorization: Bearer KEY' or 'X-API-Key: KEY'.")
    app.state.pool, app.state.batcher, app.state.settings = pool, batcher, settings
    app.state.metrics = metrics
    install_middleware(app, settings, metrics)
    install_error_handlers(app, metrics)

    def resolve(name: str | None, request: Request):
        if name is None:
            if len(pool.models) != 1:
                raise ApiError(422, "invalid_request", "give \"model\": several are served: "
                               + ", ".join(pool.names()))
            name = pool.names()[0]
        if name not in pool.models:
            raise ApiError(404, "model_not_found", f"unknown model {name!r}; served models: "
                           + ", ".join(pool.names()))
        request.state.model = name
        return pool.models[name]

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
              tags=["classification"])
    async def classify(body: ClassifyRequest, request: Request):
        served = resolve(body.model, request)
        check_texts(body.texts, body.text_pairs, settings)
        try:
            preds = await batcher.submit(served.name, "classify", body.texts, body.text_pairs)
        except QueueFull:
            raise ApiError(503, "overloaded", f"the request queue is full ({settings.queue_size} "
                           "waiting, --queue-size); retry shortly",
                           headers={"Retry-After": "1"}) from None
        except Exception as e:  # raised by the model in the worker thread
            raise ApiError(500, "inference", f"{type(e).__name__}: {e}") from None
        return {"model": served.name, "predictions": preds}

    @app.post("/v1/explain", response_model=ExplainResponse, responses=ERRORS,
              tags=["classification"])
    async def explain_texts(body: ExplainRequest, request: Request):
        served = resolve(body.model, request)
        check_texts(body.texts, body.text_pairs, settings)
        labels = served.predictor.labels
        if body.label is not None and body.label not in labels:
            raise ApiError(422, "invalid_request", f"label {body.label!r} is not a label of "
                           f"{served.name}: " + ", ".join(labels))
        try:  # many gradient passes: in a worker thread beside the batcher, not through it
            found = await asyncio.to_thread(explain, served.predictor, body.texts,
                                            body.text_pairs, label=body.label,
                                            method=body.method, steps=body.steps)
        except Exception as e:
            raise ApiError(500, "inference", f"{type(e).__name__}: {e}") from None
        return {"model": served.name, "method": body.method, "explanations": [
            {"label": e.label, "score": e.score, "predicted": e.predicted, "words": e.words,
             "scores": e.word_scores, "pair_words": e.pair_words,
             "pair_scores": e.pair_scores, "delta": e.delta} for e in found]}

    @app.get("/v1/models", tags=["models"])
    async def list_models():
        return {"models": [s.describe() for s in pool.models.values()]}

    @app.post("/v1/models", status_code=201, responses=ERRORS, tags=["models"])
    async def add_model(body: AddModelRequest, request: Request):
        if body.name in pool.models:
            raise ApiError(409, "conflict", f"a model named {body.name!r} is already served")
        try:  # loading runs torch: keep it off the event loop
            served = await asyncio.to_thread(pool.add, body.name, Path(body.run_dir))
        except TunelabError as e:
            raise ApiError(422, "invalid_run", str(e)) from None
        request.state.model = served.name
        return served.describe()

    @app.get("/health", tags=["service"])
    async def health():
        return {"status": "ok", "models": pool.names(), "queue_depth": batcher.depth()}

    @app.get("/metrics", tags=["service"])
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def check_texts(texts: list[str], pairs: list[str] | None, settings: ServeSettings) -> None:
    if not texts:
        raise ApiError(422, "invalid_request", "texts is empty: give at least one text")
    if len(texts) > settings.max_texts:
        raise ApiError(413, "too_large", f"texts has {len(texts)} items; the limit (--max-texts) "
                       f"is {settings.max_texts}: texts[{settings.max_texts}] is the first "
                       "over it; split the request")
    if pairs is not None and len(pairs) != len(texts):
        raise ApiError(422, "invalid_request", f"text_pairs has {len(pairs)} items but texts "
                       f"has {len(texts)}: give one pair per text")
    for field, items in (("texts", texts), ("text_pairs", pairs or [])):
        for i, text in enumerate(items):
            if len(text) > settings.max_chars:
                raise ApiError(413, "too_large", f"{field}[{i}] has {len(text)} characters; the "
                               f"limit (--max-chars) is {settings.max_chars}")


def install_middleware(app: FastAPI, settings: ServeSettings, metrics: Metrics) -> None:
    key = settings.api_key.encode() if settings.api_key else None
    limit = settings.max_body_bytes()

    @app.middleware("http")
    async def guard_and_measure(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        if key is not None and (path.startswith("/v1/") or path == "/metrics"):
            given = request.headers.get("x-api-key") or ""
            auth = request.headers.get("authorization") or ""
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), key):
                response = error_response(
                    metrics, 401, "unauthorized", "missing or wrong API key: send "
                    "'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                    {"WWW-Authenticate": "Bearer"})
                return record(metrics, request, response, start)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            response = error_response(
                metrics, 413, "too_large", f"request body of {length} bytes is larger than "
                f"--max-texts and --max-chars allow ({limit} bytes)")
            return record(metrics, request, response, start)
        return record(metrics, request, await call_next(request), start)


def record(metrics: Metrics, request: Request, response, start: float):
    route = request.scope.get("route")  # unset when refused before routing
    endpoint = getattr(route, "path", None) or (
        request.url.path if request.url.path in KNOWN_PATHS else "other")  # bounded label values
    model = getattr(request.state, "model", "")
    metrics.requests.labels(endpoint, model, str(response.status_code)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    return response


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
    """RUN_DIR (named after its folder) or NAME=RUN_DIR."""
    out, seen = [], set()
    for spec in specs:
        name, _, folder = spec.partition("=")
        if not folder or Path(spec).exists():
            name, folder = Path(spec).resolve().name, spec
        if name in seen:
            raise ConfigError(f"two runs are served as {name!r}: name one with NAME=RUN_DIR")
        seen.add(name)
        out.append((name, Path(folder)))
    return out


def serve(specs: list[str], settings: ServeSettings) -> None:
    import uvicorn

    pool = ModelPool(settings.precision, settings.max_batch)
    for name, folder in parse_run_specs(specs):
        served = pool.add(name, folder)
        print(f"loaded {name}: {served.method} on {served.base_model} from {folder} "
              f"({served.private_bytes / 2**20:.2f} MB of its own)", flush=True)
    app = create_app(pool, settings)
    print(f"serving {', '.join(pool.names())} on http://{settings.host}:{settings.port} "
          f"(API spec: /openapi.json, docs: /docs)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
