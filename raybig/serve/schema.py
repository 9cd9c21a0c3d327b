"""OpenAI completions schema: request validation, errors, and per-request text state.

Everything a client sends is checked here and turned into `ApiError` (an OpenAI-shaped 4xx),
so nothing a client sends can reach the model as something that raises a 500.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raybig.model import is_greedy
from raybig.serve.engine import Row
from raybig.tokenizer import encode


class ApiError(Exception):
    """An error with an HTTP status, rendered as OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class CompletionRequest(BaseModel):
    """POST /v1/completions. Strict types: "5" is not a number; unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    echo: bool = False
    logprobs: int | None = None
    user: str | None = None


def check_content_type(content_type: str | None) -> None:
    """Refuse (415) any Content-Type but JSON or none.

    Refusing text/plain and form types also keeps a browser page from posting here cross-site
    without a CORS preflight.
    """
    if not content_type:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"Unsupported Content-Type {content_type[:80]!r}; send 'application/json'.",
                       code="unsupported_media_type")


def body_limit(gen: Any) -> int:
    r"""Most request bytes worth reading.

    Every prompt at its token limit, JSON-escaped (up to 6 bytes per byte-token, as \u00XX), plus
    1 MiB for everything else.
    """
    return 6 * gen.max_prompt_tokens * gen.max_prompts + 2**20


def parse_request(raw: bytes) -> CompletionRequest:
    """The request body as a `CompletionRequest`; raises `ApiError` 400 naming the bad field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {str(e)[:200]}") from None
    except RecursionError:  # json.loads recurses once per nesting level
        raise ApiError(400, "We could not parse the JSON body of your request: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        req = CompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = str(err["loc"][0]) if err["loc"] else None
        raise ApiError(400, f"Invalid value for '{param}': {err['msg']}", param=param) from None
    if req.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    if req.logprobs is not None:
        raise ApiError(400, "logprobs is not supported", param="logprobs")
    return req


@dataclass
class Choice:
    """Text state of one generated sequence: incremental UTF-8 decoding and stop strings."""

    index: int
    row: Row
    stop: list[str]
    text: str = ""
    finish_reason: str | None = None
    emitted: int = 0
    reported: bool = False  # finish_reason already streamed
    _dec: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    def feed(self, tok: int | None) -> None:
        """Take the row's new token (None: the row finished or failed) and update text and finish."""
        if self.finish_reason is not None:
            return
        if tok is None and self.row.error is not None:
            self.finish_reason = "error"
            return
        if tok is not None:
            self.text += self._dec.decode(bytes([tok]))
            for s in self.stop:
                at = self.text.find(s, max(0, len(self.text) - len(s) - 4))
                if at >= 0:
                    self.text, self.finish_reason, self.row.done = self.text[:at], "stop", True
                    return
        if tok is None or len(self.row.out) >= self.row.max_new:
            self.text += self._dec.decode(b"", final=True)
            self.finish_reason = "length"
            self.row.done = True

    def delta(self) -> str:
        """New text that can be shown: holds back a tail that might still become a stop string."""
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted:end], end
        return out


@dataclass
class Job:
    """One HTTP request: its rows (prompts x n) and what has been sent back so far."""

    model: str
    prompt_tokens: int
    choices: list[Choice]
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    closed: bool = False

    @property
    def rows(self) -> list[Row]:
        """The engine rows of this request, in choice order."""
        return [c.row for c in self.choices]

    @property
    def done(self) -> bool:
        """Every choice has a finish_reason."""
        return all(c.finish_reason is not None for c in self.choices)

    @property
    def error(self) -> ApiError | None:
        """The OpenAI-shaped 500 to answer with if generating any row of this request failed."""
        msg = next((c.row.error for c in self.choices if c.row.error is not None), None)
        if msg is None:
            return None
        return ApiError(500, f"Generating this completion failed: {msg}", type_="server_error",
                        code="generation_failed")

    def abort(self) -> None:
        """Stop every row of this request: one failed, so the request fails as a whole."""
        for c in self.choices:
            c.row.done = True
            if c.finish_reason is None:
                c.finish_reason = "error"

    def usage(self) -> dict[str, int]:
        """OpenAI `usage`: prompt, completion and total token counts."""
        comp = sum(len(c.row.out) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": comp,
                "total_tokens": self.prompt_tokens + comp}

    def response(self) -> dict[str, Any]:
        """The whole non-streamed `text_completion` body."""
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"text": c.text, "index": c.index, "logprobs": None,
                             "finish_reason": c.finish_reason} for c in self.choices],
                "usage": self.usage()}

    def parts(self) -> list[tuple[int, str, str | None]]:
        """(index, new text, finish_reason) per choice with news; each finish is reported once."""
        parts = []
        for c in self.choices:
            d = c.delta()
            final = c.finish_reason is not None and not c.reported
            if d or final:
                parts.append((c.index, d, c.finish_reason if final else None))
                c.reported = c.reported or final
        return parts

    def chunk(self, parts: list[tuple[int, str, str | None]], usage: bool = False) -> dict[str, Any]:
        """One streamed `text_completion` event holding `parts` (and `usage` if asked)."""
        d = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
             "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": f} for i, t, f in parts]}
        if usage:
            d["usage"] = self.usage()
        return d


def feed_jobs(jobs: list[Job], toks: list[int | None]) -> list[Any]:
    """Hand one `Batch.step()`'s tokens (one per row, rows in job order) to their jobs.

    Returns, per job, its new `parts()` or `StopIteration` once it has ended (what the Serve batch
    handler yields). A job one of whose rows failed is aborted and ended at once; `job.error` then
    holds its OpenAI-shaped error. Its batch-mates are untouched.
    """
    k = 0
    out: list[Any] = []
    for j in jobs:
        for c in j.choices:
            c.feed(toks[k])
            k += 1
        if j.closed:
            out.append(StopIteration)
            continue
        if j.error is not None:
            j.abort()
            j.closed = True
            out.append(StopIteration)
            continue
        out.append(j.parts())
        j.closed = j.done
    return out


def build_job(req: CompletionRequest, model_name: str, gen: Any, context: int | None) -> Job:
    """Check a request against the spec's limits and the model's context; make its rows."""
    if req.model is not None and req.model != model_name:
        raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}'.",
                       param="model", code="model_not_found")
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise ApiError(400, "prompt must not be an empty list", param="prompt")
    if len(prompts) > gen.max_prompts:
        raise ApiError(400, f"at most {gen.max_prompts} prompts per request (got {len(prompts)})",
                       param="prompt")
    if req.n > gen.max_n:
        raise ApiError(400, f"n={req.n} exceeds this server's limit of {gen.max_n}", param="n")
    max_tokens = req.max_tokens if req.max_tokens is not None else gen.max_tokens
    if max_tokens > gen.max_new_tokens:
        raise ApiError(400, f"max_tokens={max_tokens} exceeds this server's limit of {gen.max_new_tokens}",
                       param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
    temp = gen.temperature if req.temperature is None else req.temperature
    top_p = gen.top_p if req.top_p is None else req.top_p
    ids = [encode(p) for p in prompts]
    choices: list[Choice] = []
    for p, toks in enumerate(ids):
        if not toks:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if len(toks) > gen.max_prompt_tokens:
            raise ApiError(400, f"prompt has {len(toks)} tokens; the limit is {gen.max_prompt_tokens}",
                           param="prompt", code="context_length_exceeded")
        if context is not None and len(toks) + max_tokens > context:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt ({len(toks)}) plus "
                           f"max_tokens ({max_tokens}) exceed it", param="max_tokens",
                           code="context_length_exceeded")
        for j in range(req.n):
            g = None
            if req.seed is not None and not is_greedy(temp):
                g = torch.Generator().manual_seed((req.seed + p * req.n + j) % 2**63)
            row = Row(list(toks), max_tokens, temp, top_p, g)
            choices.append(Choice(p * req.n + j, row, stop))
    return Job(model_name, sum(len(t) for t in ids), choices)
