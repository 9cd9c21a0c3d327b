"""Batched generation with a KV cache for exported raybig models.

Rows of different prompt lengths are left-padded into one (B, T) tensor. Each row keeps its own
positions (so padding does not shift the absolute position embeddings) and a key mask hides the
pad keys from every query. With one row and no padding the op sequence is exactly the model's own
`forward_cached`, so greedy text from a lone request matches `GPT.generate` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F

from raybig.model import GPT, sample_next


@dataclass
class Row:
    """One sequence to extend."""

    prompt: list[int]
    max_new: int
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    done: bool = False
    out: list[int] = field(default_factory=list)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every Linear (weights int8, activations quantized per batch)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch flags quantized tensors as deprecated; they still work
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def context_limit(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "block_size", None)


class Batch:
    """Decode state of a batch of rows: call `step()` until `all_done`."""

    def __init__(self, model: nn.Module, rows: list[Row]):
        self.model, self.rows = model, rows
        self.cached = _is_gpt(model)
        self.lens = torch.tensor([len(r.prompt) for r in rows])
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.ids: torch.Tensor | None = None
        self.t = 0  # decode steps taken

    @property
    def all_done(self) -> bool:
        return all(r.done or len(r.out) >= r.max_new for r in self.rows)

    @torch.inference_mode()
    def step(self) -> list[int | None]:
        """Generate one token for every unfinished row; returns it per row (None for finished)."""
        logits = self._logits()
        greedy = logits.argmax(dim=-1).tolist()  # one op for every temperature-0 row
        toks: list[int | None] = []
        for i, r in enumerate(self.rows):
            if r.done or len(r.out) >= r.max_new:
                r.done = True
                toks.append(None)
                continue
            if r.temperature <= 0:
                tok = greedy[i]
            else:
                tok = int(sample_next(logits[i:i + 1], r.temperature, r.top_p, r.generator)[0, 0])
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
        m: GPT = self.model  # type: ignore[assignment]
        B, T = len(self.rows), int(self.lens.max())
        pad = T - self.lens  # (B,)
        ids = torch.zeros(B, T, dtype=torch.long)
        for i, r in enumerate(self.rows):
            ids[i, int(pad[i]):] = torch.tensor(r.prompt)
        self.padded = bool(pad.any())
        ar = torch.arange(T)
        pos = (ar.view(1, T) - pad.view(B, 1)).clamp(min=0)  # (B, T) per-row positions
        self.key_valid = ar.view(1, T) >= pad.view(B, 1)  # (B, S) pad keys are invalid
        mask = None
        if self.padded:
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            # Pad queries attend to themselves only, so no row of the softmax is empty (no NaNs).
            own = torch.eye(T, dtype=torch.bool)
            mask = (causal & self.key_valid.view(B, 1, T)) | own  # (B, T, S)
            mask = mask.view(B, 1, T, T)
        x = m.wte(ids) + (m.wpe(pos) if self.padded else m.wpe(ar))
        self.cache = []
        for block in m.h:
            x, kv = _block(block, x, None, mask, causal=not self.padded)
            self.cache.append(kv)
        return m.lm_head(m.ln_f(x[:, -1:, :]))[:, -1, :]

    def _decode(self) -> torch.Tensor:
        m: GPT = self.model  # type: ignore[assignment]
        B = len(self.rows)
        pos = self.lens + self.t - 1  # position of the token being fed
        x = m.wte(self._last)
        x = x + (m.wpe(pos).view(B, 1, -1) if self.padded else m.wpe(pos[:1]))
        mask = None
        if self.padded:
            self.key_valid = torch.cat([self.key_valid, torch.ones(B, 1, dtype=torch.bool)], dim=1)
            mask = self.key_valid.view(B, 1, 1, -1)
        new = []
        for i, block in enumerate(m.h):
            x, kv = _block(block, x, self.cache[i], mask, causal=False)
            new.append(kv)
        self.cache = new
        return m.lm_head(m.ln_f(x))[:, -1, :]


def _is_gpt(model: nn.Module) -> bool:
    return isinstance(model, GPT) or type(model).__name__ == "GPT" and hasattr(model, "h")


def _block(block: nn.Module, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None,
           mask: torch.Tensor | None, causal: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    a, kv = _attn(block.attn, block.ln_1(x), cache, mask, causal)
    x = x + a
    x = x + block.mlp(block.ln_2(x))
    return x, kv


def _attn(attn: nn.Module, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None,
          mask: torch.Tensor | None, causal: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    # Same op order as CausalSelfAttention.forward, plus an optional per-row mask.
    B, T, C = x.size()
    q, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
    if cache is not None:
        k = torch.cat([cache[0], k], dim=2)
        v = torch.cat([cache[1], v], dim=2)
    if mask is not None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and cache is None)
    y = y.transpose(1, 2).contiguous().view(B, T, C)
    return attn.c_proj(y), (k, v)


def generate_batch(model: nn.Module, rows: list[Row]) -> list[list[int]]:
    """Run rows to completion (no stop strings); returns the new tokens per row."""
    b = Batch(model, rows)
    while not b.all_done:
        b.step()
    return [r.out for r in rows]
