"""The one GPT, in one file after nanoGPT: training, evaluation and serving all call `GPT.forward`.

Pre-norm blocks, causal self-attention through `scaled_dot_product_attention`, tied input/output
embeddings, GPT-2 weight init, and a `KVCache` that `forward` grows in place for generation.
Shapes: B batch, T new tokens, S keys (cached + new), C channels (n_embd), H heads, D head size
(C // H), V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily (argmax), as vLLM's `_SAMPLING_EPS` does: softmax(z / T)
is argmax to within float32 there anyway, and `logits / T` would overflow float32 as T nears 0."""


@dataclass
class GPTConfig:
    """Shape and regularisation of a `GPT`; `to_dict()` is what an export's config.json holds."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    """Context length: the number of position embeddings (tokens a sequence may hold)."""
    vocab_size: int = 256
    dropout: float = 0.0
    bias: bool = False
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass (training only; never with a KV cache)."""

    def to_dict(self) -> dict:
        """The fields as a plain JSON-able dict."""
        return asdict(self)


class KVCache:
    """Keys and values of every layer for the positions seen so far; `GPT.forward` appends to it.

    Layer i holds (k, v), each (B, H, S, D) in the model's dtype. S (`length`) is the same for every
    row: a left-padded row keeps its pad keys here too, and the caller hides them with `key_mask`.
    """

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def length(self) -> int:
        """S: positions cached so far (0 when empty)."""
        return self.layers[0][0].size(2) if self.layers else 0

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append layer `i`'s new keys/values (B, H, T, D); returns all of them, (B, H, S + T, D)."""
        if i < len(self.layers):
            k = torch.cat([self.layers[i][0], k], dim=2)
            v = torch.cat([self.layers[i][1], v], dim=2)
            self.layers[i] = (k, v)
        else:
            self.layers.append((k, v))
        return k, v


class SlotKVCache:
    """Preallocated keys/values for `slots` sequences of up to `max_len` tokens (continuous batching).

    `k` and `v` are (L, N, H, M, D) in the model's dtype: L layers, N slots, M = `max_len`. A token at
    absolute position p of the sequence in slot s lives at index p of slot s, so a slot needs no
    padding and nothing is ever concatenated; a slot is reused as is (stale keys past a row's
    position are hidden by the causal rule `key <= query position`).

    Before each `GPT.forward(idx, positions=..., cache=cache)` the caller picks the slots of the B
    rows with `select(slots)`; the forward then writes each row's T new keys at its `positions` and
    attends over indices 0..max(positions) of its slot.
    """

    def __init__(self, n_layer: int, slots: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, slots, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.rows = torch.zeros(0, dtype=torch.long, device=device)  # (B,) slot of each row
        self.positions = torch.zeros(0, 0, dtype=torch.long, device=device)  # (B, T) this call's positions
        self.all_logits = False
        """True: the next forwards return logits of every position, (B, T, V) (prompt scoring);
        False: of the last position only, (B, 1, V), computed exactly as with a `KVCache`."""

    @classmethod
    def for_model(cls, model: GPT, slots: int, max_len: int) -> SlotKVCache:
        """A cache shaped for `model` (its layers, heads, head size, dtype and device)."""
        c = model.config
        w = model.wte.weight
        return cls(c.n_layer, slots, c.n_head, max_len, c.n_embd // c.n_head, w.dtype, w.device)

    def select(self, slots: list[int]) -> None:
        """Bind the next forward's B rows to these slots (one per row, distinct)."""
        self.rows = torch.tensor(slots, dtype=torch.long, device=self.k.device)

    def start(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Record this forward's (B, T) positions; the attention mask it needs, (B, 1, T, S) bool.

        None when every row's new tokens are the last T of S keys (one row, or rows in step): then
        the plain causal rules of `CausalSelfAttention` apply, exactly as with a `KVCache`.

        Raises:
            ValueError: a position is negative or >= max_len, or the rows do not match `select`.
        """
        B, T = positions.shape
        if B != self.rows.numel():
            raise ValueError(f"{B} rows but {self.rows.numel()} slots selected")
        if int(positions.min()) < 0 or int(positions.max()) >= self.max_len:
            raise ValueError(f"positions must lie in [0, {self.max_len})")
        self.positions = positions
        S = int(positions.max()) + 1
        if bool((positions[:, -1] == S - 1).all()) and bool((positions[:, 0] == S - T).all()):
            return None
        keys = torch.arange(S, device=positions.device)
        return (keys.view(1, 1, S) <= positions.view(B, T, 1)).view(B, 1, T, S)

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer `i`'s new keys/values (B, H, T, D) at the recorded positions.

        Returns the rows' keys/values 0..S-1, (B, H, S, D) contiguous, S = max position + 1.
        """
        rows, pos = self.rows.view(-1, 1), self.positions  # (B, 1), (B, T)
        self.k[i][rows, :, pos] = k.transpose(1, 2)  # advanced indices first: (B, T, H, D)
        self.v[i][rows, :, pos] = v.transpose(1, 2)
        S = int(pos.max()) + 1
        return (self.k[i, :, :, :S].index_select(0, self.rows),
                self.v[i, :, :, :S].index_select(0, self.rows))


class Linear(nn.Linear):
    """nn.Linear with GPT-2's init, N(0, std) weights and zero bias, done in its own constructor.

    Each module initialises itself (rather than the GPT re-initialising everything afterwards) so a
    build under `deepspeed.zero.Init`, which partitions every module's parameters as its constructor
    returns, draws exactly the same numbers as a whole-model build with the same seed.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02):
        self.init_std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        """N(0, init_std) weight, zero bias."""
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding with GPT-2's N(0, 0.02) init in its own constructor (see `Linear`)."""

    def reset_parameters(self) -> None:
        """N(0, 0.02) weight."""
        nn.init.normal_(self.weight, mean=0.0, std=0.02)


class LayerNorm(nn.Module):
    """LayerNorm with optional bias (torch's cannot turn the bias off on older versions)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C), normalised over C."""
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, optionally over a KV cache and a per-row attention mask."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias, std=resid_std(cfg))
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | SlotKVCache | None = None, layer: int = 0) -> torch.Tensor:
        """(B, T, C) -> (B, T, C).

        `mask` (B, 1, T, S) bool, True = may attend, replaces the causal rule when given. Without it:
        plain causal attention when nothing is cached; with cached keys, each new token sees every
        cached key and the new tokens up to itself. `cache` gets this call's keys as layer `layer`.
        """
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, D)
        p = self.dropout if self.training else 0.0
        S = k.size(2)
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        elif S == T:  # nothing cached before this call
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        elif T == 1:  # one new token may attend to every cached key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # a block of new tokens on top of a cache: causal within the block
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> C with tanh-GELU."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias, std=resid_std(cfg))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


def resid_std(cfg: GPTConfig) -> float:
    """GPT-2's init std of the residual projections (c_proj): 0.02 / sqrt(2 * n_layer)."""
    return 0.02 / math.sqrt(2 * cfg.n_layer)


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | SlotKVCache | None = None, layer: int = 0) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); `mask`, `cache`, `layer` as in `CausalSelfAttention.forward`."""
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2-style decoder-only language model (nanoGPT's layout, so its weights' names match)."""

    # Keys dropped from exported weights because they alias another tensor.
    tied_keys = ("lm_head.weight",)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        # Every module initialises itself (GPT-2's init; see `Linear`), so zero.Init builds match.
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (the tied head counted once); `non_embedding` leaves out the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                cache: KVCache | SlotKVCache | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or the training loss, for token ids `idx`.

        Args:
            idx: (B, T) int64 token ids in [0, vocab_size).
            targets: (B, T) int64 next-token ids. Given: returns the mean cross-entropy (a float32
                scalar) over all B*T positions (targets of -100 are not scored); the training
                contract every raybig model follows.
            positions: (B, T) int64 absolute positions of `idx`, per row (a left-padded row starts
                later). Default: cache.length + 0..T-1 for every row. Each must be < block_size.
            key_mask: (B, S) bool, S = cache.length + T: False hides that key (a pad) from every
                query. Default: no key hidden. A query whose own key is hidden attends to itself
                only, so no softmax row is empty.
            cache: a `KVCache` to attend over and append this call's keys/values to (inference);
                or a `SlotKVCache` (continuous batching): `positions` required, `key_mask` unused,
                rows bound to slots by `SlotKVCache.select`; each row's new keys are written at its
                positions and it attends to its slot's keys up to each query's position.
            doc_ids: (B, T) int64 example number of each token within its row (packed training rows;
                -1 on padding), no cache: a token attends only to earlier tokens of its own example
                (a block-diagonal causal mask), so packed examples never see each other. Pass
                `positions` restarting at 0 per example with it. Not combined with `key_mask`.

        Returns:
            (B, T, V) logits in the model's dtype; with a `KVCache`, (B, 1, V) logits of the last
            position only (all that decoding needs, as nanoGPT does at inference); with a
            `SlotKVCache`, the same, or (B, T, V) if its `all_logits` is set; with `targets`,
            the loss.

        Raises:
            AssertionError: positions run past `block_size` (default positions only).
            ValueError: a `SlotKVCache` without `positions`, or positions outside its slots; `doc_ids`
                with a cache or with `key_mask`.
        """
        B, T = idx.size()
        if isinstance(cache, SlotKVCache):
            if positions is None:
                raise ValueError("a SlotKVCache needs explicit positions (B, T)")
            mask = cache.start(positions)  # (B, 1, T, S) or None
            x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
            for i, block in enumerate(self.h):
                x = block(x, mask, cache, i)
            if cache.all_logits:
                return self.lm_head(self.ln_f(x))  # (B, T, V)
            return self.lm_head(self.ln_f(x[:, -1:, :]))  # (B, 1, V), the same call as with a KVCache
        past = cache.length if cache is not None else 0
        if positions is None:
            assert past + T <= self.config.block_size, \
                f"sequence of {past + T} > block_size {self.config.block_size}"
            positions = torch.arange(past, past + T, device=idx.device)  # (T,), shared by all rows
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
        mask = None
        if doc_ids is not None:
            if cache is not None or key_mask is not None:
                raise ValueError("doc_ids (packed training rows) cannot be combined with a cache or key_mask")
            same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T): query's example == key's
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (same & causal).view(B, 1, T, T)  # block-diagonal causal; the diagonal is always kept
        elif key_mask is not None:
            S = past + T
            causal = torch.ones(T, S, dtype=torch.bool, device=idx.device).tril(diagonal=S - T)
            own = torch.zeros(T, S, dtype=torch.bool, device=idx.device)
            own.diagonal(offset=S - T).fill_(True)
            mask = ((causal & key_mask[:, None, :]) | own).view(B, 1, T, S)  # (B, 1, T, S)
        for i, block in enumerate(self.h):
            if self.config.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache, i)
        if cache is not None:
            return self.lm_head(self.ln_f(x[:, -1:, :]))  # (B, 1, V)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """`idx` (B, T) int64 followed by `max_new_tokens` sampled ids: (B, T + max_new_tokens).

        Sampling as `sample_next` (temperature below `GREEDY_BELOW` is greedy). Past `block_size`
        the window slides: the last block_size tokens are recomputed without the cache.
        """
        cache: KVCache | None = None
        bs = self.config.block_size
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and idx.size(1) <= bs:
                logits = self(idx[:, -1:], cache=cache)
            else:  # prefill, or past the context window: recompute the cropped window
                fresh = KVCache()
                logits = self(idx[:, -bs:], cache=fresh)
                cache = fresh if use_cache and idx.size(1) < bs else None
            nxt = sample_next(logits[:, -1, :], temperature, top_p, generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def is_greedy(temperature: float) -> bool:
    """Whether `temperature` means argmax: below `GREEDY_BELOW` (0 included), or NaN."""
    return not temperature >= GREEDY_BELOW


def sample_next(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) int64 token ids, sampled in float32.

    Greedy when `is_greedy(temperature)`. Otherwise softmax(logits / temperature), cut to the
    smallest set of most likely tokens whose mass reaches `top_p` (the most likely token is always
    kept, so any top_p > 0 works), and drawn with `generator`. Every finite input gives a valid
    distribution: if logits / temperature overflows float32 the logits are shifted by their max first.

    Raises:
        ValueError: the logits are not all finite (a model fault; sampling would be meaningless).
    """
    logits = logits.float()
    if is_greedy(temperature):
        return logits.argmax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model produced non-finite logits (inf or NaN)")
    z = logits / temperature
    if not bool(torch.isfinite(z).all()):  # |logit| / T past float32's range: shift to <= 0 first
        z = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    probs = F.softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p
        keep[..., 0] = True
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, sorted_i, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at context `seq_len`: 6N + 12·L·C·T.

    N counts the matmul weights (blocks and the tied head; not embeddings' lookups, not norms).
    Source: PaLM (Chowdhery et al. 2022), appendix B.
    """
    n = 12 * cfg.n_layer * cfg.n_embd**2 + cfg.vocab_size * cfg.n_embd  # matmul weights (tied head)
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len
