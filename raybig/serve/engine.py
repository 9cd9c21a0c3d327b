"""Batched generation with a KV cache for exported raybig models.

Rows of different prompt lengths are left-padded into one (B, T) tensor and run through the model's
own `GPT.forward`: each row passes its own positions (so padding does not shift the absolute
position embeddings) and a key mask hides the pad keys from every query. With one row (or rows
of one length) nothing is padded and the call is exactly the one `GPT.generate` makes, so greedy
text from a lone request matches `GPT.generate` bit for bit.

A row is isolated from its batch-mates: an error while sampling it fails that row alone (`Row.error`)
and the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from raybig.errors import first_line
from raybig.model import GPT, KVCache, is_greedy, sample_next


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


def generate_batch(model: nn.Module, rows: list[Row]) -> list[list[int]]:
    """Run rows to completion (no stop strings); returns the new tokens per row.

    A failed row's tokens stop where it failed (see `Row.error`).
    """
    b = Batch(model, rows)
    while not b.all_done:
        b.step()
    return [r.out for r in rows]
