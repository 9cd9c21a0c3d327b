"""What every raybig HTTP app shares: its args, OpenAI-shaped errors, body limits and the API key check.

Used by the completions app (`raybig.serve.app`) and the prediction app (`raybig.serve.classify`),
neither of which imports the other's module for it.
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress.

import hashlib
import hmac
import json
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from raybig.serve.schema import ApiError

__all__ = ["AppArgs", "AsciiJSONResponse", "api_key_digest", "check_api_key", "error_response",
           "install_error_handlers", "read_body"]


class AppArgs(BaseModel):
    """Everything a replica needs; JSON-serialisable so it fits in Serve's declarative config."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    model_name: str
    quantize: str = "none"
    generation: dict[str, Any] = {}
    max_num_seqs: int = 8
    batching_mode: str = "continuous"
    max_prefill_tokens: int = 512
    batch_wait_timeout_s: float = 0.01
    torch_threads: int = 1
    # sha256 of the API key (hex): the key itself never enters the config, the dashboard or logs.
    api_key_sha256: str | None = None
    deployment: dict[str, Any] = {}  # Serve options (autoscaling_config, ray_actor_options, ...)
    task: str = "causal_lm"  # "classification": the export is a classifier (raybig.serve.classify)
    max_inputs: int = 256  # classifier: most examples per /v1/predict request


class AsciiJSONResponse(JSONResponse):
    r"""JSON with non-ASCII escaped.

    An error message may quote client text holding lone surrogates ("\ud800" is valid JSON), which
    Starlette's UTF-8 encode would turn into a 500.
    """

    def render(self, content: Any) -> bytes:
        """`content` as ASCII-only JSON bytes; NaN/inf refused (ValueError)."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_response(e: ApiError) -> JSONResponse:
    """An ApiError as OpenAI's JSON error body (401s also say `WWW-Authenticate: Bearer`)."""
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


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    typ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(ApiError(exc.status_code, str(exc.detail), type_=typ))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(ApiError(400, str(exc.errors()[:1])))


def install_error_handlers(app: FastAPI) -> None:
    """FastAPI's own 404/405/422 answered in OpenAI's error shape (every raybig HTTP app)."""
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]


def check_api_key(request: Request, want_sha256: str | None) -> None:
    """Raise ApiError 401 unless the request's Bearer token hashes to `want_sha256` (None: no key)."""
    if want_sha256 is None:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    got = hashlib.sha256(token.encode()).hexdigest()
    # Constant-time compare, and no early exit on a missing header.
    if not hmac.compare_digest(got, want_sha256) or not token:
        raise ApiError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                       type_="authentication_error", code="invalid_api_key")


def api_key_digest(env_name: str | None) -> str | None:
    """sha256 of the key in env var `env_name`; raises KeyError if it is named but unset."""
    if env_name is None:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise KeyError(env_name)
    return hashlib.sha256(key.encode()).hexdigest()
