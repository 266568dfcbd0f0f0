"""What every route module shares: the error handlers raise and its JSON body, the request
limits, and how a request's "model" becomes a served run (and why a run cannot answer it)."""
from __future__ import annotations

from fastapi import Request
from pydantic import BaseModel

from tunelab.serve.pool import ModelPool, Served


class ErrorBody(BaseModel):
    error: dict[str, str]


ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 503)}


class ApiError(Exception):
    """Answered as `{"error": {"type": kind, "message": message}}` with `status`."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def overloaded(what: str, size: int, flag: str) -> ApiError:
    return ApiError(503, "overloaded", f"the {what} is full ({size} {flag}); retry shortly",
                    headers={"Retry-After": "1"})


def resolve(pool: ModelPool, name: str | None, endpoint: str, request: Request) -> Served:
    """The run `name` names, or, without a name, the one served run this endpoint can use.
    A run of a task the endpoint does not serve is a 400 that names the right endpoint."""
    if name is None:
        able = [s.name for s in pool.models.values() if endpoint in s.endpoints]
        if len(able) != 1:
            which = (f"several are served for {endpoint}: " + ", ".join(able) if able else
                     f"none of the served models ({', '.join(pool.names())}) serves {endpoint}")
            raise ApiError(422, "invalid_request", f"give \"model\": {which}")
        name = able[0]
    served = pool.models.get(name)
    if served is None:
        raise ApiError(404, "model_not_found", f"unknown model {name!r}; served models: "
                       + ", ".join(pool.names()))
    request.state.model = name
    if endpoint not in served.endpoints:
        kind = f"a {served.task} run"
        if served.export is not None:
            kind = f"an {served.export} export (ONNX Runtime: no gradients to explain with)"
        elif served.task == "causal_lm":
            kind += " whose tokenizer has no chat template"
        raise ApiError(400, "wrong_task", f"model {name!r} is {kind}; {endpoint} cannot serve "
                       f"it: use {' or '.join(served.endpoints)}")
    return served


def check_texts(texts: list[str], pairs: list[str] | None, limits,
                field: str = "texts") -> None:
    """`limits`: the ServeSettings (max_texts, max_chars)."""
    if not texts:
        raise ApiError(422, "invalid_request", f"{field} is empty: give at least one")
    check_count(len(texts), field, limits)
    if pairs is not None and len(pairs) != len(texts):
        raise ApiError(422, "invalid_request", f"text_pairs has {len(pairs)} items but {field} "
                       f"has {len(texts)}: give one pair per text")
    for name, items in ((field, texts), ("text_pairs", pairs or [])):
        for i, text in enumerate(items):
            check_chars(len(text), f"{name}[{i}]", limits)


def check_count(n: int, field: str, limits) -> None:
    if n > limits.max_texts:
        raise ApiError(413, "too_large", f"{field} has {n} items; the limit (--max-texts) is "
                       f"{limits.max_texts}: {field}[{limits.max_texts}] is the first over it; "
                       "split the request")


def check_chars(n: int, where: str, limits) -> None:
    if n > limits.max_chars:
        raise ApiError(413, "too_large", f"{where} has {n} characters; the limit (--max-chars) "
                       f"is {limits.max_chars}")
