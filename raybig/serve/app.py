"""The Ray Serve application: an OpenAI-compatible completions and chat API over a raybig export.

`build_app(args)` is the app builder named by the declarative config
(`import_path: raybig.serve.app:build_app`); `args` is `AppArgs` as a dict.

Each replica runs one continuous-batching engine (`raybig.serve.engine.AsyncEngine`): a request
submits its rows and awaits their tokens on its own asyncio queue (streamed or not alike). A client
that goes away (the stream closed, the request cancelled by Serve's proxy) has its rows removed
before the next engine step and is counted in `raybig_serve_cancelled_total`.
`batching.mode: static` keeps the older `@serve.batch` path (whole batches; the benchmark baseline).
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress.

import asyncio
import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from raybig.metrics import RequestTimer, serve_batch, serve_cancelled
from raybig.serve.http import (
    AppArgs,
    check_api_key,
    error_response,
    install_error_handlers,
    read_body,
)
from raybig.serve.schema import (
    ApiError,
    Job,
    body_limit,
    build_chat_job,
    build_job,
    check_content_type,
    feed_job,
    feed_jobs,
    parse_chat,
    parse_request,
    render_chat,
)
from raybig.spec.serve import GenerationSpec

DEPLOYMENT = "Completions"


api = FastAPI(title="raybig completions")


install_error_handlers(api)


# Defined above the deployment: Serve pickles the class with the module globals it sees then.
def _rss_bytes() -> int:
    """This process's resident set size in bytes (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


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

        from raybig.serve.engine import AsyncEngine, Engine, context_limit, load_hf, quantize_int8
        from raybig.train.export import PROVENANCE, export_format, load_model, load_tokenizer, read_config

        self.args = AppArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        cfg = read_config(self.args.checkpoint)
        self.tokenizer: Any = None  # None: raybig's byte tokenizer (no chat template)
        model: Any
        if export_format(cfg) == "hf" and PROVENANCE not in cfg:  # any save_pretrained causal LM
            model, self.tokenizer = load_hf(self.args.checkpoint)
            meta: dict[str, Any] = {"format": "hf"}
        else:
            model, meta = load_model(self.args.checkpoint)
            tok = load_tokenizer(self.args.checkpoint)
            if tok.name != "bytes":
                self.tokenizer = tok
        if self.args.quantize == "int8":
            model = quantize_int8(model)
        elif torch.cuda.is_available() and self.args.deployment.get("ray_actor_options", {}).get("num_gpus"):
            # The replica's GPU (Ray sets CUDA_VISIBLE_DEVICES): bf16 where native, else fp16.
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            model = model.to(device="cuda", dtype=dtype)
        self.model, self.meta = model.eval(), meta
        self.context = context_limit(model)
        self.gen = GenerationSpec.model_validate(self.args.generation)
        self.static = self.args.batching_mode == "static"
        max_len = self.gen.max_prompt_tokens + self.gen.max_new_tokens
        self.engine = AsyncEngine(
            Engine(model, self.args.max_num_seqs, max_len, self.args.max_prefill_tokens),
            on_step=lambda rows: serve_batch(self.args.model_name, rows))
        self._run.set_max_batch_size(self.args.max_num_seqs)
        self._run.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self.created = int(time.time())

    # --- auth ---------------------------------------------------------------------------------

    def _check_key(self, request: Request) -> None:
        check_api_key(request, self.args.api_key_sha256)

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
            return error_response(e)
        return {"object": "list", "data": [{"id": self.args.model_name, "object": "model",
                                            "created": self.created, "owned_by": "raybig",
                                            "context_length": self.context,
                                            "quantize": self.args.quantize}]}

    @api.get("/v1/engine/stats")
    async def engine_stats(self, request: Request) -> Any:
        """Internal: the engine's counters (`Engine.stats()`) and this replica's RSS in bytes."""
        try:
            self._check_key(request)
        except ApiError as e:
            return error_response(e)
        return {**self.engine.engine.stats(), "rss_bytes": _rss_bytes()}

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
            job = build_job(req, self.args.model_name, self.gen, self.context, self.tokenizer)
        except ApiError as e:
            timer.done(e.status)
            return error_response(e)
        return await self._answer(job, req.stream, req.stream_options, timer)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        """OpenAI `POST /v1/chat/completions`, streamed or not.

        Messages are rendered by the tokenizer's chat template; 400 `model has no chat template`
        when it has none (raybig's byte tokenizer).
        """
        timer = RequestTimer(self.args.model_name)
        try:
            self._check_key(request)
            check_content_type(request.headers.get("content-type"))
            req = parse_chat(await read_body(request, body_limit(self.gen)))
            prompt = render_chat(req, self.tokenizer)
            job = build_chat_job(req, prompt, self.args.model_name, self.gen, self.context, self.tokenizer)
        except ApiError as e:
            timer.done(e.status)
            return error_response(e)
        return await self._answer(job, req.stream, req.stream_options, timer)

    @api.post("/v1/predict")
    async def predict(self) -> Any:
        """Not offered for a language model: 404 `unsupported_route` pointing at the completions routes."""
        from raybig.serve.predict import wrong_route

        return error_response(wrong_route(self.args.model_name, "language model",
                                "POST /v1/completions or /v1/chat/completions"))

    async def _answer(self, job: Job, stream: bool, stream_options: dict[str, Any] | None,
                      timer: RequestTimer) -> Any:
        if stream:
            usage = bool((stream_options or {}).get("include_usage"))
            return StreamingResponse(self._sse(job, usage, timer), media_type="text/event-stream")
        gen = self._steps(job)
        try:
            async for _ in gen:
                timer.first()
        finally:
            await gen.aclose()  # a cancelled request (client gone) frees its rows here
        if (err := job.error) is not None:  # this request's generation failed; its batch-mates did not
            timer.done(err.status, job)
            return error_response(err)
        timer.done(200, job)
        return JSONResponse(job.response())

    def _steps(self, job: Job) -> AsyncGenerator[list[Any], None]:
        return self._run(job) if self.static else self._generate(job)

    async def _generate(self, job: Job) -> AsyncGenerator[list[Any], None]:
        """Submit the job's rows to the engine; yield its new `parts()` after each step it advanced.

        If the consumer stops early (client gone: generator closed or task cancelled), the rows are
        cancelled before the next engine step and the request counted as cancelled.
        """
        q: asyncio.Queue[list[Any] | None] = asyncio.Queue()

        def on_step(toks: dict[int, int | None]) -> None:
            parts = feed_job(job, toks)
            if parts is not None:
                q.put_nowait(parts)
            if job.closed:
                q.put_nowait(None)

        handle = self.engine.submit(job.rows, on_step)
        try:
            while (parts := await q.get()) is not None:
                yield parts
        finally:
            if self.engine.cancel(handle) and job.error is None:
                serve_cancelled(self.args.model_name)

    async def _sse(self, job: Job, usage: bool, timer: RequestTimer | None = None) -> AsyncIterator[str]:
        gen = self._steps(job)
        try:
            async for parts in gen:
                if parts:
                    if timer is not None:
                        timer.first()
                    yield f"data: {json.dumps(job.chunk(parts))}\n\n"
        finally:
            await gen.aclose()
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
    """App builder for Serve's declarative config (and for `serve.run` in-process).

    A classifier export (`task: classification` in the args) gets the prediction app
    (`raybig.serve.classify`); every other export the completions app.
    """
    a = AppArgs.model_validate(args)
    if a.task == "classification":
        from raybig.serve.classify import build_classifier_app

        return build_classifier_app(a)
    deployment = cast(serve.Deployment, Completions)  # what @serve.deployment made of the class
    return deployment.options(**a.deployment).bind(a.model_dump())
