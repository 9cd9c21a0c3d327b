"""Generation for exported raybig models: the continuous-batching `Engine`, and the static `Batch`.

`Engine` (what replicas run) schedules rows at every step, after vLLM's v1 scheduler: finished or
cancelled rows leave and free their KV slot, waiting rows are admitted while slots are free, and
their prompts are prefilled (chunked into `max_prefill_tokens` per step) between decode steps of
the running rows. Keys/values live in a preallocated `raybig.model.SlotKVCache`, one slot per row
(no concatenation per token), and every forward is the model's own `GPT.forward`. A lone row's
prefill and decode calls are exactly the ones `GPT.generate` makes, so its greedy text equals
`GPT.generate` bit for bit; among other rows it gets the same tokens (same math, batched).
`AsyncEngine` runs an `Engine` on an asyncio task, one step at a time in a worker thread.

`Batch` (static batching: `batching.mode: static`, kept for the benchmark baseline):
Rows of different prompt lengths are left-padded into one (B, T) tensor and run through the model's
own `GPT.forward`: each row passes its own positions (so padding does not shift the absolute
position embeddings) and a key mask hides the pad keys from every query. With one row (or rows
of one length) nothing is padded and the call is exactly the one `GPT.generate` makes, so greedy
text from a lone request matches `GPT.generate` bit for bit.

A row is isolated from its batch-mates: an error while sampling it fails that row alone (`Row.error`)
and the others go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from raybig.errors import first_line
from raybig.model import GPT, KVCache, SlotKVCache, is_greedy, sample_next

log = logging.getLogger(__name__)

TokenLogprob = tuple[float, dict[int, float]]
"""(log-probability of the chosen token, {token id: log-probability} of the top-k tokens)."""


@dataclass
class Row:
    """One sequence to extend: prompt token ids, sampling settings, and what it generated so far.

    `temperature` below `raybig.model.GREEDY_BELOW` is greedy; `top_p` in (0, 1]; `generator` seeds
    sampling (None: torch's global RNG). `error` is set (and `done`) if generating this row failed.
    """

    prompt: list[int]
    max_new: int
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    done: bool = False
    out: list[int] = field(default_factory=list)
    error: str | None = None
    logprobs: int | None = None
    """Top-k log-probabilities to record per generated token (None: none; 0: the chosen token's)."""
    echo: bool = False
    """Record the prompt tokens' log-probabilities too (`prompt_lps`; the first token's is None)."""
    lps: list[TokenLogprob] = field(default_factory=list)
    prompt_lps: list[TokenLogprob | None] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Stopped, failed, or at its `max_new` tokens (a `max_new` 0 row: once its prompt is scored)."""
        return self.done or len(self.out) >= self.max_new > 0

    def fail(self, e: BaseException) -> None:
        """Stop this row because of `e`; its batch-mates go on."""
        self.error, self.done = first_line(e), True


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every Linear (weights int8, activations quantized per batch)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch flags quantized tensors as deprecated; they still work
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def context_limit(model: nn.Module) -> int | None:
    """The model's context length in tokens (`config.block_size`), or None if it declares none."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "block_size", None)


class Batch:
    """Decode state of a batch of rows: call `step()` until `all_done`."""

    def __init__(self, model: nn.Module, rows: list[Row]):
        self.model, self.rows = model, rows
        self.cached = _is_gpt(model)
        self.lens = torch.tensor([len(r.prompt) for r in rows])  # (B,) prompt lengths
        self.cache: KVCache | None = None
        self.key_mask: torch.Tensor | None = None  # (B, S) bool; None while no row is padded
        self._last = torch.zeros(len(rows), 1, dtype=torch.long)  # (B, 1) token fed next
        self.t = 0  # decode steps taken

    @property
    def all_done(self) -> bool:
        """Every row finished: stopped, failed, or at its `max_new` tokens."""
        return all(r.done or len(r.out) >= r.max_new for r in self.rows)

    @torch.inference_mode()
    def step(self) -> list[int | None]:
        """Generate one token for every unfinished row; returns it per row (None: finished or failed).

        Never raises for a row's sake: a sampling error fails that row (`Row.error`); an error in the
        batched forward (which no single row can be blamed for) fails every unfinished row.
        """
        try:
            logits = self._logits()  # (B, V)
        except Exception as e:  # turned into per-row errors, reported to clients
            for r in self.rows:
                if not (r.done or len(r.out) >= r.max_new):
                    r.fail(e)
            return [None] * len(self.rows)
        greedy = logits.argmax(dim=-1).tolist()  # one op for every greedy row
        toks: list[int | None] = []
        for i, r in enumerate(self.rows):
            if r.done or len(r.out) >= r.max_new:
                r.done = True
                toks.append(None)
                continue
            try:
                if is_greedy(r.temperature):
                    tok = greedy[i]
                else:
                    tok = int(sample_next(logits[i:i + 1], r.temperature, r.top_p, r.generator)[0, 0])
            except Exception as e:  # this row alone fails
                r.fail(e)
                toks.append(None)
                continue
            r.out.append(tok)
            toks.append(tok)
        self._last = torch.tensor([(r.out[-1] if r.out else 0) for r in self.rows]).view(-1, 1)
        self.t += 1
        return toks

    # --- forward ------------------------------------------------------------------------------

    def _logits(self) -> torch.Tensor:
        if not self.cached:
            return self._logits_full()
        if self.cache is None:
            return self._prefill()
        return self._decode()

    def _logits_full(self) -> torch.Tensor:
        """Plug-in models without a KV cache: recompute each row's whole sequence."""
        out = []
        for r in self.rows:
            idx = torch.tensor([r.prompt + r.out])
            lim = context_limit(self.model)
            if lim:
                idx = idx[:, -lim:]
            out.append(self.model(idx)[:, -1, :])
        return torch.cat(out, dim=0)

    def _prefill(self) -> torch.Tensor:
        B, T = len(self.rows), int(self.lens.max())
        pad = T - self.lens  # (B,) left padding per row
        ids = torch.zeros(B, T, dtype=torch.long)
        for i, r in enumerate(self.rows):
            ids[i, int(pad[i]):] = torch.tensor(r.prompt)
        self.cache = KVCache()
        if not bool(pad.any()):  # the call GPT.generate makes
            return self.model(ids, cache=self.cache)[:, -1, :]
        ar = torch.arange(T)
        pos = (ar.view(1, T) - pad.view(B, 1)).clamp(min=0)  # (B, T); pads sit at position 0
        self.key_mask = ar.view(1, T) >= pad.view(B, 1)  # (B, T) pad keys are False
        return self.model(ids, positions=pos, key_mask=self.key_mask, cache=self.cache)[:, -1, :]

    def _decode(self) -> torch.Tensor:
        if self.key_mask is None:
            return self.model(self._last, cache=self.cache)[:, -1, :]
        B = len(self.rows)
        pos = (self.lens + self.t - 1).view(B, 1)  # (B, 1) position of the token being fed
        self.key_mask = torch.cat([self.key_mask, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        return self.model(self._last, positions=pos, key_mask=self.key_mask, cache=self.cache)[:, -1, :]


def _is_gpt(model: nn.Module) -> bool:
    return isinstance(model, GPT) or type(model).__name__ == "GPT" and hasattr(model, "h")


def token_logprob(logits: torch.Tensor, tok: int, k: int) -> TokenLogprob:
    """(V,) logits -> (log p(tok), top-k {id: log p}), in float32 from the raw (untempered) logits."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: dict[int, float] = {}
    if k > 0:
        vals, ids = lp.topk(min(k, lp.numel()))
        top = {int(i): float(v) for v, i in zip(vals, ids, strict=True)}
    return float(lp[tok]), top


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM (`save_pretrained` folder) behind the engine's plug-in interface.

    The simpler path for models that are not raybig's GPT: each row keeps its own transformers
    `DynamicCache` (`Seq.past`), prefilled once and extended one token per step by a (1, 1) forward,
    so a step costs one small forward per row rather than one batched forward. `forward(idx)`
    (no cache) returns (B, T, V) logits, as every plug-in model does.
    """

    hf = True

    def __init__(self, model: nn.Module, block_size: int | None = None):
        super().__init__()
        self.model = model
        self.block_size = block_size
        import inspect

        # transformers >= 5.2x names the cache argument `cache` (past_key_values is deprecated).
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def config(self) -> Any:
        """The wrapped model's config, with `block_size` (its context length) for `context_limit`."""
        return self

    def forward(self, idx: torch.Tensor, past: Any = None) -> tuple[torch.Tensor, Any]:
        """(B, T) int64 ids (after `past`, a DynamicCache or None) -> ((B, T, V) logits, the new cache)."""
        kw = {self._cache_kw: past} if past is not None else {}
        out = self.model(input_ids=idx, use_cache=True, **kw)
        return out.logits, getattr(out, "past_key_values", None) or getattr(out, "cache", None)


class HFTokenizer:
    """A transformers tokenizer behind raybig's `Tokenizer` protocol (plus its chat template).

    `encode` adds the model's special tokens (e.g. Llama's BOS) as the model was trained with;
    `decode` drops special tokens. `eos` holds the ids that end generation (generation config first).
    """

    name = "hf"

    def __init__(self, tok: Any, eos: set[int]):
        self.tok, self.eos = tok, eos
        self.vocab_size = len(tok)
        self.chat_template = getattr(tok, "chat_template", None)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text` (with the model's BOS etc. unless `special` is False)."""
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens left out."""
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def apply_chat_template(self, msgs: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        """The chat prompt text of `msgs` by the tokenizer's template."""
        return str(self.tok.apply_chat_template(msgs, tokenize=tokenize, add_generation_prompt=add_generation_prompt))


def load_hf(folder: str) -> tuple[HFCausalLM, HFTokenizer]:
    """A `save_pretrained` causal-LM folder -> (model for the engine, its tokenizer); float32 on CPU.

    End-of-sequence ids come from generation_config.json (else the model config, else the tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    eos: Any = None
    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:  # no generation_config.json
        pass
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None) or tok.eos_token_id
    ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
    ctx = getattr(model.config, "max_position_embeddings", None)
    return HFCausalLM(model, ctx), HFTokenizer(tok, ids)


@dataclass(eq=False)
class Seq:
    """A row in the engine: its KV slot and how many of its tokens are in the cache (`fed`)."""

    row: Row
    req: Request
    index: int  # the row's index in its request
    slot: int = -1
    fed: int = 0
    past: Any = None  # an HF model's own cache of this row (HFCausalLM only)


@dataclass(eq=False)
class Request:
    """The engine's handle on one submitted group of rows (one HTTP request).

    `on_step({row index: token or None})` is called on the event loop after every step in which a
    row of it produced a token (None: the row finished without one, or failed: see `Row.error`).
    """

    rows: list[Row]
    on_step: Callable[[dict[int, int | None]], None]
    cancelled: bool = False
    seqs: list[Seq] = field(default_factory=list)


Events = list[tuple[Request, dict[int, int | None]]]


class Engine:
    """Iteration-level scheduler of rows over preallocated KV slots (see the module docstring).

    Call `add` and `cancel` from one thread, and `schedule()` then `run()` each step (`step()` does
    both); `run()` may run in a worker thread while `add`/`cancel` go on (they only queue or flag).

    Args:
        model: a raybig `GPT` (KV-cached), or any module mapping (1, T) ids to (1, T, V) logits
            (recomputed each step).
        max_num_seqs: rows decoded together, one KV slot each; more wait.
        max_len: tokens a slot holds (prompt + new); capped at the model's block size.
        max_prefill_tokens: prompt tokens prefilled per step; longer prompts take several steps.
    """

    def __init__(self, model: nn.Module, max_num_seqs: int = 8, max_len: int | None = None,
                 max_prefill_tokens: int = 512):
        self.model = model
        self.cached = _is_gpt(model)
        self.hf = bool(getattr(model, "hf", False))
        lim = context_limit(model)
        self.max_len = min(x for x in (max_len, lim, 1 << 20) if x)
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max(1, max_prefill_tokens)
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.cache = SlotKVCache.for_model(model, max_num_seqs, self.max_len) if self.cached else None  # type: ignore[arg-type]
        self.free = list(range(max_num_seqs - 1, -1, -1))
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.steps = 0
        self.cancelled_rows = 0
        self.generated = 0

    # --- submission (event-loop side) ------------------------------------------------------------

    def add(self, rows: list[Row], on_step: Callable[[dict[int, int | None]], None]) -> Request:
        """Queue a request's rows (FIFO); returns its handle."""
        req = Request(rows, on_step)
        req.seqs = [Seq(r, req, i) for i, r in enumerate(rows)]
        self.waiting.extend(req.seqs)
        return req

    def cancel(self, req: Request) -> int:
        """Stop a request's unfinished rows; their slots are freed at the next `schedule()`.

        Returns the number of rows that were still generating (0: it had finished).
        """
        req.cancelled = True
        n = 0
        for s in req.seqs:
            if not s.row.finished:
                n += 1
                s.row.done = True
        self.cancelled_rows += n
        return n

    @property
    def has_work(self) -> bool:
        """Rows are waiting or running."""
        return bool(self.waiting or self.running)

    def stats(self) -> dict[str, int]:
        """Counters for `/v1/engine/stats`.

        Active (running) and waiting rows, free slots, steps taken, rows cancelled, tokens generated.
        """
        return {"active": len(self.running), "waiting": len(self.waiting), "free_slots": len(self.free),
                "max_num_seqs": self.max_num_seqs, "steps": self.steps,
                "cancelled_rows": self.cancelled_rows, "generated_tokens": self.generated}

    # --- one step -------------------------------------------------------------------------------

    def schedule(self) -> None:
        """Finished and cancelled rows leave (slots freed); waiting rows join while slots are free."""
        keep = []
        for s in self.running:
            if s.row.finished or s.req.cancelled:
                if s.slot >= 0:
                    self.free.append(s.slot)
                s.slot, s.past = -1, None
            else:
                keep.append(s)
        self.running = keep
        while self.waiting and (self.free or not self.cached) and \
                (self.cached or len(self.running) < self.max_num_seqs):
            s = self.waiting.popleft()
            if s.req.cancelled or s.row.done:
                continue
            if self.cached:
                s.slot = self.free.pop()
            self.running.append(s)

    @torch.inference_mode()
    def run(self) -> Events:
        """One step over the scheduled rows; returns each request's new tokens.

        Decodes every prefilled row by one token, then prefills waiting prompts within the budget.

        Never raises: a forward error fails the rows of that forward; a sampling error its row.
        """
        out: dict[int, tuple[Request, dict[int, int | None]]] = {}

        def emit(s: Seq, tok: int | None) -> None:
            out.setdefault(id(s.req), (s.req, {}))[1][s.index] = tok

        live = [s for s in self.running if not (s.row.finished or s.req.cancelled)]
        dec = [s for s in live if s.fed >= len(s.row.prompt) and s.row.out]
        pre = [s for s in live if s.fed < len(s.row.prompt)]
        if dec:
            try:
                logits = self._decode(dec)  # (B, V)
            except Exception as e:  # no single row to blame: fail them all
                for s in dec:
                    s.row.fail(e)
                    emit(s, None)
            else:
                greedy = logits.argmax(dim=-1).tolist()
                for i, s in enumerate(dec):
                    emit(s, self._sample(s.row, logits[i], greedy[i]))
        budget = self.max_prefill_tokens
        for s in pre:
            if budget <= 0:
                break
            n = min(len(s.row.prompt) - s.fed, budget)
            budget -= n
            try:
                last = self._prefill(s, n)  # (V,) logits at the chunk's last position
            except Exception as e:
                s.row.fail(e)
                emit(s, None)
                continue
            if s.fed == len(s.row.prompt):  # prompt done: its first token, or none (max_new 0)
                if s.row.max_new <= 0:
                    s.row.done = True
                    emit(s, None)
                else:
                    emit(s, self._sample(s.row, last, int(last.argmax())))
        self.steps += 1
        return list(out.values())

    def step(self) -> Events:
        """`schedule()` then `run()`, then hand each request its tokens (`Request.on_step`)."""
        self.schedule()
        events = self.run()
        deliver(events)
        return events

    # --- forward and sampling ---------------------------------------------------------------------

    def _sample(self, row: Row, logits: torch.Tensor, greedy: int) -> int | None:
        try:
            tok = greedy if is_greedy(row.temperature) else \
                int(sample_next(logits.view(1, -1), row.temperature, row.top_p, row.generator)[0, 0])
            if row.logprobs is not None:
                row.lps.append(token_logprob(logits, tok, row.logprobs))
        except Exception as e:  # this row alone fails
            row.fail(e)
            return None
        row.out.append(tok)
        self.generated += 1
        return tok

    def _decode(self, dec: list[Seq]) -> torch.Tensor:
        if self.hf:
            rows = []
            for s in dec:
                logits, s.past = self.model(torch.tensor([[s.row.out[-1]]], device=self.device), s.past)
                s.fed += 1
                rows.append(logits[:, -1, :])
            return torch.cat(rows, dim=0)
        if self.cache is None:
            return torch.cat([self._full(s.row.prompt + s.row.out) for s in dec], dim=0)
        ids = torch.tensor([[s.row.out[-1]] for s in dec], device=self.device)  # (B, 1)
        pos = torch.tensor([[s.fed] for s in dec], device=self.device)  # (B, 1): position of the fed token
        self.cache.select([s.slot for s in dec])
        self.cache.all_logits = False
        logits = self.model(ids, positions=pos, cache=self.cache)[:, -1, :]  # (B, V)
        for s in dec:
            s.fed += 1
        return logits

    def _prefill(self, s: Seq, n: int) -> torch.Tensor:
        row, a = s.row, s.fed
        chunk = row.prompt[a:a + n]
        if self.hf:
            logits, s.past = self.model(torch.tensor([chunk], device=self.device), s.past)
            logits = logits[0]  # (n, V)
        elif self.cache is None:
            logits = self.model(torch.tensor([row.prompt[:a + n]], device=self.device))[0, a:]  # (n, V)
        else:
            self.cache.select([s.slot])
            self.cache.all_logits = row.echo
            logits = self.model(torch.tensor([chunk], device=self.device),
                                positions=torch.arange(a, a + n, device=self.device).view(1, n),
                                cache=self.cache)[0]  # (n, V) or (1, V)
        if row.echo:
            if a == 0:
                row.prompt_lps.append(None)  # nothing predicts the first token
            for j in range(n):
                if a + j + 1 < len(row.prompt):
                    row.prompt_lps.append(token_logprob(logits[j], row.prompt[a + j + 1], row.logprobs or 0))
        s.fed += n
        return logits[-1]

    def _full(self, ids: list[int]) -> torch.Tensor:
        """Plug-in models without a KV cache: the last position's logits, (1, V)."""
        idx = torch.tensor([ids], device=self.device)
        lim = context_limit(self.model)
        return self.model(idx[:, -lim:] if lim else idx)[:, -1, :]


def deliver(events: Events) -> None:
    """Hand each live request its tokens; a callback that raises cancels its request only."""
    for req, toks in events:
        if req.cancelled:
            continue
        try:
            req.on_step(toks)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine
            log.exception("a request's consumer failed; cancelling it")
            req.cancelled = True


class AsyncEngine:
    """An `Engine` driven by one asyncio task on the caller's event loop.

    `submit` and `cancel` run on the loop; each step's forward runs in a worker thread so the loop
    keeps taking requests, and tokens are delivered on the loop before the next step is scheduled
    (so a stop string seen by a request ends its row before another token is generated).
    """

    def __init__(self, engine: Engine, on_step: Callable[[int], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # called with the number of rows in each step (metrics)
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    def submit(self, rows: list[Row], on_step: Callable[[dict[int, int | None]], None]) -> Request:
        """Queue rows; `on_step` gets their tokens after each step (see `Request`)."""
        req = self.engine.add(rows, on_step)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        assert self._wake is not None
        self._wake.set()
        return req

    def cancel(self, req: Request) -> int:
        """Stop a request's rows (removed before the next step); returns rows that were generating."""
        return self.engine.cancel(req)

    async def _loop(self) -> None:
        e = self.engine
        assert self._wake is not None
        while True:
            if not e.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            e.schedule()
            if not e.running:
                continue
            if self.on_step is not None:
                self.on_step(len(e.running))
            try:
                events = await asyncio.to_thread(e.run)
            except Exception:  # noqa: BLE001 - run() never raises; keep serving if it ever does
                log.exception("engine step failed")
                continue
            deliver(events)


def generate_batch(model: nn.Module, rows: list[Row]) -> list[list[int]]:
    """Run rows to completion (no stop strings); returns the new tokens per row.

    A failed row's tokens stop where it failed (see `Row.error`).
    """
    b = Batch(model, rows)
    while not b.all_done:
        b.step()
    return [r.out for r in rows]
