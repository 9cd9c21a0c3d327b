"""The Ray Serve application: an OpenAI-compatible completions API over a raybig export.

`build_app(args)` is the app builder named by the declarative config
(`import_path: raybig.serve.app:build_app`); `args` is `AppArgs` as a dict.
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress.

import asyncio
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raybig.metrics import RequestTimer, serve_batch
from raybig.serve.schema import (
    ApiError,
    Job,
    body_limit,
    build_job,
    check_content_type,
    feed_jobs,
    parse_request,
)
from raybig.spec.serve import GenerationSpec

DEPLOYMENT = "Completions"


class AppArgs(BaseModel):
    """Everything a replica needs; JSON-serialisable so it fits in Serve's declarative config."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    model_name: str
    quantize: str = "none"
    generation: dict[str, Any] = {}
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    torch_threads: int = 1
    # sha256 of the API key (hex): the key itself never enters the config, the dashboard or logs.
    api_key_sha256: str | None = None
    deployment: dict[str, Any] = {}  # Serve options (autoscaling_config, ray_actor_options, ...)


api = FastAPI(title="raybig completions")


class AsciiJSONResponse(JSONResponse):
    r"""JSON with non-ASCII escaped.

    An error message may quote client text holding lone surrogates ("\ud800" is valid JSON), which
    Starlette's UTF-8 encode would turn into a 500.
    """

    def render(self, content: Any) -> bytes:
        """`content` as ASCII-only JSON bytes; NaN/inf refused (ValueError)."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _err(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return AsciiJSONResponse(e.body(), status_code=e.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and len(declared) < 20 and int(declared) > limit:
        raise ApiError(413, f"Request body of {declared} bytes exceeds this server's limit of {limit}.",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"Request body exceeds this server's limit of {limit} bytes.",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    typ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _err(ApiError(exc.status_code, str(exc.detail), type_=typ))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _err(ApiError(400, str(exc.errors()[:1])))


# Typed Any: serve.batch's stubs describe functions that return lists, not async generators.
_batched: Any = serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class Completions:
    """One replica: the model, the OpenAI routes, and the batch handler that runs every request.

    Args:
        args: `AppArgs` as a dict (what Serve's declarative config carries).
    """

    def __init__(self, args: dict[str, Any]):
        import torch

        from raybig.serve.engine import context_limit, quantize_int8
        from raybig.train.export import load_model

        self.args = AppArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        model, meta = load_model(self.args.checkpoint)
        if self.args.quantize == "int8":
            model = quantize_int8(model)
        self.model, self.meta = model, meta
        self.context = context_limit(model)
        self.gen = GenerationSpec.model_validate(self.args.generation)
        self._run.set_max_batch_size(self.args.max_batch_size)
        self._run.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self.created = int(time.time())

    # --- auth ---------------------------------------------------------------------------------

    def _check_key(self, request: Request) -> None:
        want = self.args.api_key_sha256
        if want is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        got = hashlib.sha256(token.encode()).hexdigest()
        # Constant-time compare, and no early exit on a missing header.
        if not hmac.compare_digest(got, want) or not token:
            raise ApiError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                           type_="authentication_error", code="invalid_api_key")

    # --- routes -------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness: `{"status": "ok", "model": name}` (no key needed)."""
        return {"status": "ok", "model": self.args.model_name}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        """OpenAI `GET /v1/models`: the one model served, with its context length; 401 without the key."""
        try:
            self._check_key(request)
        except ApiError as e:
            return _err(e)
        return {"object": "list", "data": [{"id": self.args.model_name, "object": "model",
                                            "created": self.created, "owned_by": "raybig",
                                            "context_length": self.context,
                                            "quantize": self.args.quantize}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        """OpenAI `POST /v1/completions`, streamed (server-sent events) or not.

        Client errors are OpenAI-shaped 4xx (`ApiError`); a request whose generation failed gets an
        OpenAI-shaped 500 (or, once streaming, a final `error` event) while its batch-mates finish.
        """
        timer = RequestTimer(self.args.model_name)  # Prometheus: requests, latency, TTFT, tokens
        try:
            self._check_key(request)
            check_content_type(request.headers.get("content-type"))
            req = parse_request(await read_body(request, body_limit(self.gen)))
            job = build_job(req, self.args.model_name, self.gen, self.context)
        except ApiError as e:
            timer.done(e.status)
            return _err(e)
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._sse(job, usage, timer), media_type="text/event-stream")
        async for _ in self._run(job):
            timer.first()
        if (err := job.error) is not None:  # this request's generation failed; its batch-mates did not
            timer.done(err.status, job)
            return _err(err)
        timer.done(200, job)
        return JSONResponse(job.response())

    async def _sse(self, job: Job, usage: bool, timer: RequestTimer | None = None) -> AsyncIterator[str]:
        async for parts in self._run(job):
            if parts:
                if timer is not None:
                    timer.first()
                yield f"data: {json.dumps(job.chunk(parts))}\n\n"
        if (err := job.error) is not None:  # the status (200) is sent: end with OpenAI's error event
            yield f"data: {json.dumps(err.body())}\n\n"
            if timer is not None:
                timer.done(err.status, job)
            return
        if usage:
            yield f"data: {json.dumps({**job.chunk([], usage=True), 'choices': []})}\n\n"
        yield "data: [DONE]\n\n"
        if timer is not None:
            timer.done(200, job)

    # --- batched generation ---------------------------------------------------------------------

    @_batched  # Serve gathers concurrent `_run(job)` calls into one `_run(jobs)`
    async def _run(self, jobs: list[Job]) -> AsyncIterator[list[Any]]:
        """All rows of all jobs in one KV-cached batch; yields each job's new text per step.

        A job one of whose rows failed ends at once (`Job.error` says why); the others go on.
        """
        from raybig.serve.engine import Batch

        serve_batch(self.args.model_name, len(jobs))
        batch = Batch(self.model, [r for j in jobs for r in j.rows])
        while not all(j.done for j in jobs):
            toks = await asyncio.to_thread(batch.step)  # the event loop keeps taking requests
            yield feed_jobs(jobs, toks)


def build_app(args: dict[str, Any]) -> serve.Application:
    """App builder for Serve's declarative config (and for `serve.run` in-process)."""
    a = AppArgs.model_validate(args)
    deployment = cast(serve.Deployment, Completions)  # what @serve.deployment made of the class
    return deployment.options(**a.deployment).bind(a.model_dump())


def api_key_digest(env_name: str | None) -> str | None:
    """sha256 of the key in env var `env_name`; raises KeyError if it is named but unset."""
    if env_name is None:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise KeyError(env_name)
    return hashlib.sha256(key.encode()).hexdigest()
