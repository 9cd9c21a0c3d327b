"""OpenAI completions and chat schema: request validation, errors, and per-request text state.

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
from raybig.tokenizer import BYTE_VOCAB, decode, encode


class ApiError(Exception):
    """An error with an HTTP status, rendered as OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class SamplingRequest(BaseModel):
    """The fields completions and chat share.

    Strict types: "5" is not a number; unknown OpenAI fields are ignored.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """Text, texts, token ids, or lists of token ids (what lm-eval's local-completions sends)."""
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False
    logprobs: int | None = None


MAX_LOGPROBS = 5
"""Most top log-probabilities per token a request may ask for (OpenAI's completions limit too)."""

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatMessage(BaseModel):
    """One chat message: a known role and text content (a string, or a list of `text` parts)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string; raises ValueError for non-text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            out.append(part["text"])
        return "".join(out)


class ChatRequest(SamplingRequest):
    """POST /v1/chat/completions (the fields raybig honours; others are ignored)."""

    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False


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
    """The request body as a `CompletionRequest`; raises `ApiError` 400 naming the bad field.

    `logprobs` must lie in 0..`MAX_LOGPROBS`; `max_tokens: 0` only with `echo` (scoring a prompt);
    `logprobs` and `echo` are not supported with `stream`.
    """
    req = _parse(raw, CompletionRequest)
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be between 0 and {MAX_LOGPROBS} (got {req.logprobs})",
                       param="logprobs")
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(400, "max_tokens must be at least 1 (0 only with echo, to score the prompt)",
                       param="max_tokens")
    if req.stream and (req.echo or req.logprobs is not None):
        raise ApiError(400, "logprobs and echo are not supported with stream",
                       param="echo" if req.echo else "logprobs")
    return req


def parse_chat(raw: bytes) -> ChatRequest:
    """The body as a `ChatRequest`; raises `ApiError` 400 for malformed messages or unknown roles."""
    req = _parse(raw, ChatRequest)
    if not req.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise ApiError(400, f"messages[{i}].role {m.role[:40]!r} is not one of {', '.join(ROLES)}",
                           param="messages")
        try:
            m.text()
        except ValueError as e:
            raise ApiError(400, f"messages[{i}].content: {e}", param="messages") from None
    if req.logprobs:
        raise ApiError(400, "logprobs is not supported on chat completions", param="logprobs")
    return req


def render_chat(req: ChatRequest, tokenizer: Any) -> str:
    """The prompt text of `req.messages` by the tokenizer's chat template (generation prompt added).

    Raises `ApiError` 400 when the model has no chat template (raybig's byte tokenizer).
    """
    if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
        raise ApiError(400, "model has no chat template", param="messages", code="no_chat_template")
    msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        return str(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    except Exception as e:  # noqa: BLE001 - a template that refuses these messages (jinja raise_exception)
        raise ApiError(400, f"the chat template refused these messages: {str(e)[:200]}",
                       param="messages") from None


def _parse(raw: bytes, model: Any) -> Any:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {str(e)[:200]}") from None
    except RecursionError:  # json.loads recurses once per nesting level
        raise ApiError(400, "We could not parse the JSON body of your request: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = str(err["loc"][0]) if err["loc"] else None
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
        raise ApiError(400, f"Invalid value for '{where}': {err['msg']}", param=param) from None


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
    echo_text: str = ""  # the prompt, when the request asked for echo
    prompt_chars: int = 0  # characters of the prompt (where generated text's offsets start)
    tok: Any = None  # the model's tokenizer (None: raybig's bytes, decoded incrementally here)
    eos: frozenset[int] = frozenset()  # ids that end generation (finish_reason "stop")
    _dec: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    def feed(self, tok: int | None) -> None:
        """Take the row's new token (None: the row finished or failed) and update text and finish."""
        if self.finish_reason is not None:
            return
        if tok is None and self.row.error is not None:
            self.finish_reason = "error"
            return
        if tok is not None and tok in self.eos:
            self.finish_reason, self.row.done = "stop", True
            return
        if tok is not None:
            if self.tok is None:
                self.text += self._dec.decode(bytes([tok]))
            else:  # any tokenizer: decode the whole output (a token may change how its left neighbour reads)
                self.text = self.tok.decode(self.row.out)
            for s in self.stop:
                at = self.text.find(s, max(0, len(self.text) - len(s) - 4))
                if at >= 0:
                    self.text, self.finish_reason, self.row.done = self.text[:at], "stop", True
                    return
        if tok is None or len(self.row.out) >= self.row.max_new:
            self.text += self._dec.decode(b"", final=True)
            self.finish_reason = "length"
            self.row.done = True

    def logprobs(self) -> dict[str, Any] | None:
        r"""OpenAI completions `logprobs`: {tokens, token_logprobs, top_logprobs, text_offset}.

        Of the echoed prompt (first entry null) and the generated tokens; None unless asked for.

        Tokens are byte tokens: printable ASCII as itself, other bytes as `bytes:\xNN`. Offsets
        count characters from the start of the prompt, as OpenAI's do.
        """
        r = self.row
        if r.logprobs is None:
            return None
        toks = (r.prompt if r.echo else []) + r.out
        lps = (r.prompt_lps if r.echo else []) + list(r.lps)
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        body: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        at = 0 if r.echo else self.prompt_chars
        for t, lp in zip(toks, lps, strict=False):
            body["tokens"].append(token_text(t, self.tok))
            body["token_logprobs"].append(None if lp is None else lp[0])
            body["top_logprobs"].append(None if lp is None else
                                        {token_text(i, self.tok): v for i, v in lp[1].items()})
            body["text_offset"].append(at)
            at += len(dec.decode(bytes([t]))) if self.tok is None else len(self.tok.decode([t]))
        return body

    def delta(self) -> str:
        """New text that can be shown: holds back a tail that might still become a stop string."""
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.stop), default=0)
        if self.tok is not None and not self.finish_reason:  # a character still being decoded
            hold = max(hold, len(self.text) - len(self.text.rstrip("\ufffd")))
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
    chat: bool = False  # a chat completion: chat.completion shapes
    _role_sent: set[int] = field(default_factory=set)

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
        """The whole non-streamed `text_completion` (or `chat.completion`) body."""
        if self.chat:
            return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                    "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": None, "finish_reason": c.finish_reason} for c in self.choices],
                    "usage": self.usage()}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"text": c.echo_text + c.text, "index": c.index, "logprobs": c.logprobs(),
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
        """One streamed `text_completion` (or `chat.completion.chunk`) event holding `parts`.

        With `usage`, the usage counts too.
        """
        if self.chat:
            choices = []
            for i, t, f in parts:
                delta: dict[str, Any] = {"content": t} if t else {}
                if i not in self._role_sent:
                    delta["role"] = "assistant"
                    self._role_sent.add(i)
                choices.append({"index": i, "delta": delta, "logprobs": None, "finish_reason": f})
            c: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                 "model": self.model, "choices": choices}
            if usage:
                c["usage"] = self.usage()
            return c
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


def token_text(t: int, tok: Any = None) -> str:
    r"""A byte token as OpenAI-style text: printable ASCII as is, any other byte as `bytes:\xNN`."""
    if tok is not None:  # the model's own tokenizer: the token's text
        return str(tok.decode([t]))
    return chr(t) if 32 <= t < 127 or t in (9, 10, 13) else f"bytes:\\x{t:02x}"


def feed_job(job: Job, toks: dict[int, int | None]) -> list[tuple[int, str, str | None]] | None:
    """Hand one engine step's tokens ({row index: token or None}) to the request's choices.

    Returns the request's new `parts()`, or None once it has ended: every choice finished (the last
    parts were returned before), or a row failed (the request is aborted; `job.error` says why).
    """
    if job.closed:
        return None
    for i, tok in toks.items():
        job.choices[i].feed(tok)
    if job.error is not None:
        job.abort()
        job.closed = True
        return None
    parts = job.parts()
    job.closed = job.done
    return parts


def build_chat_job(req: ChatRequest, prompt: str, model_name: str, gen: Any, context: int | None,
                   tokenizer: Any = None) -> Job:
    """A chat request as a one-prompt completion job (rendered `prompt`), answered in chat shapes.

    The rendered prompt already holds the template's special tokens, so none are added again.
    """
    ids = tokenizer.encode(prompt, special=False) if tokenizer is not None else encode(prompt)
    creq = CompletionRequest(model=req.model, prompt=ids,
                             max_tokens=req.max_completion_tokens or req.max_tokens,
                             temperature=req.temperature, top_p=req.top_p, stop=req.stop, seed=req.seed,
                             n=req.n, stream=req.stream, stream_options=req.stream_options)
    job = build_job(creq, model_name, gen, context, tokenizer)
    job.chat, job.id = True, f"chatcmpl-{uuid.uuid4().hex[:24]}"
    return job


def build_job(req: CompletionRequest, model_name: str, gen: Any, context: int | None,
              tokenizer: Any = None) -> Job:
    """Check a request against the spec's limits and the model's context; make its rows.

    `tokenizer`: the model's (`encode`, `decode`, `vocab_size`, optional `eos` ids); None: bytes.
    """
    if req.model is not None and req.model != model_name:
        raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}'.",
                       param="model", code="model_not_found")
    if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)):
        raw: list[Any] = [req.prompt]
    else:
        raw = list(req.prompt)
    if not raw:
        raise ApiError(400, "prompt must not be an empty list", param="prompt")
    enc, dec = (encode, decode) if tokenizer is None else (tokenizer.encode, tokenizer.decode)
    vocab = BYTE_VOCAB if tokenizer is None else tokenizer.vocab_size
    ids = [enc(p) if isinstance(p, str) else list(p) for p in raw]
    if any(not 0 <= t < vocab for toks in ids for t in toks):
        raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
    prompts = [p if isinstance(p, str) else dec(p) for p in raw]
    eos_id = getattr(tokenizer, "eos_id", None)  # raybig's BPE: <|endoftext|> ends a completion
    eos = frozenset(getattr(tokenizer, "eos", ()) or (() if eos_id is None else (eos_id,)))
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
            row = Row(list(toks), max_tokens, temp, top_p, g, logprobs=req.logprobs,
                      echo=req.echo and req.logprobs is not None)
            choices.append(Choice(p * req.n + j, row, stop, echo_text=prompts[p] if req.echo else "",
                                  prompt_chars=len(prompts[p]), tok=tokenizer, eos=eos))
    return Job(model_name, sum(len(t) for t in ids), choices)
