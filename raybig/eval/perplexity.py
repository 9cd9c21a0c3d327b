"""Mean token NLL, perplexity and bits per byte of a causal LM on held-out token windows.

Definitions (natural log throughout; NLL in nats):
    mean NLL        = total NLL / number of predicted tokens
    perplexity      = exp(mean NLL)
    bits per byte   = total NLL / ln 2 / number of UTF-8 bytes of the predicted text

Bits per byte is the tokenizer-independent measure of the Pile paper (Gao et al. 2020, "The Pile",
section 4, BPB = (L_T / L_B) * log2(e) * loss) and is what lm-eval's `bits_per_byte` aggregation
computes (`lm_eval/api/metrics.py`: -sum(loglikelihood) / sum(bytes) / ln 2). With raybig's byte
tokenizer one token is one byte, so bits per byte = mean NLL / ln 2.

Works with raybig's `GPT` (`forward(idx) -> (B, T, V)` logits), a DeepSpeed engine wrapping it, and
any transformers causal LM (`forward(input_ids) -> output.logits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F

IGNORE_INDEX = -100
"""Targets equal to this are not scored (the PyTorch / transformers convention)."""


@dataclass(frozen=True)
class PerplexityResult:
    """Sums over everything evaluated; the derived metrics are properties, so results merge exactly.

    Attributes:
        nll_sum: total negative log-likelihood of the predicted tokens, in nats.
        tokens: number of predicted (scored) tokens.
        num_bytes: UTF-8 bytes of the predicted text, or None when unknown (no bits per byte then).
    """

    nll_sum: float
    tokens: int
    num_bytes: int | None = None

    @property
    def mean_nll(self) -> float:
        """Mean NLL per token in nats (the cross-entropy a training loop reports); NaN if no tokens."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """exp(mean NLL); inf past float range, NaN if no tokens."""
        try:
            return math.exp(self.mean_nll)
        except OverflowError:
            return math.inf

    @property
    def bits_per_byte(self) -> float | None:
        """Total NLL / ln 2 / bytes (Gao et al. 2020; lm-eval `bits_per_byte`); None without bytes."""
        if not self.num_bytes:
            return None
        return self.nll_sum / math.log(2) / self.num_bytes

    def merge(self, other: PerplexityResult) -> PerplexityResult:
        """The result over both sets of tokens (bytes stay None unless both know them)."""
        nb = None if self.num_bytes is None or other.num_bytes is None else self.num_bytes + other.num_bytes
        return PerplexityResult(self.nll_sum + other.nll_sum, self.tokens + other.tokens, nb)

    def to_dict(self) -> dict[str, Any]:
        """Sums and derived metrics as a JSON-able dict.

        Keys: nll_sum, tokens, num_bytes, mean_nll, perplexity, bits_per_byte.
        """
        return {**asdict(self), "mean_nll": self.mean_nll, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


def _logits(model: Any, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx)
    return out.logits if hasattr(out, "logits") else out  # transformers returns a ModelOutput


def token_nll(model: Any, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of `targets` given `idx`, under `model`.

    Args:
        model: a causal LM; `model(idx)` returns (B, T, V) logits or an object with `.logits`.
        idx: (B, T) int64 input token ids.
        targets: (B, T) int64 next-token ids (already shifted: targets[:, t] follows idx[:, :t+1]);
            positions equal to `IGNORE_INDEX` (-100) get NLL 0.

    Returns:
        (B, T) float32 NLL in nats, computed in float32 whatever the model's dtype.

    Raises:
        ValueError: the logits' shape is not (B, T, V).
    """
    logits = _logits(model, idx)
    if logits.dim() != 3 or logits.shape[:2] != idx.shape:
        raise ValueError(f"expected logits of shape {tuple(idx.shape)} + (V,), got {tuple(logits.shape)}")
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T).to(logits.device),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(B, T)


@torch.no_grad()
def evaluate_perplexity(model: Any, windows: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                        num_bytes: int | None = None, device: torch.device | str | None = None,
                        all_reduce: bool = True) -> PerplexityResult:
    """Total NLL over `windows`, summed (and summed over ranks when torch.distributed is up).

    Args:
        model: as in `token_nll`; put in eval mode for the call and restored afterwards.
        windows: (idx, targets) pairs, each (B, T) int64 (what `Batches.val_batch` yields).
        num_bytes: UTF-8 bytes of the predicted text on this rank, for bits per byte (None: unknown).
        device: where to move each window (default: the model's first parameter's device).
        all_reduce: sum nll/tokens/bytes over ranks if a process group is initialized.

    Returns:
        A `PerplexityResult`. Note that the mean of equal-sized batches' mean losses (raybig's
        `val_loss`) equals its `mean_nll`, so perplexity = exp(val_loss) on the same batches.
    """
    if device is None:
        p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = p.device if p is not None else torch.device("cpu")
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        for idx, targets in windows:
            nll = token_nll(model, idx.to(device), targets.to(device))
            total += nll.double().sum().cpu()  # float64 sum: many windows of float32 NLLs
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    sums = [float(total), float(count), float(num_bytes or 0)]
    if all_reduce and dist.is_available() and dist.is_initialized():
        t = torch.tensor(sums, dtype=torch.float64, device=device if str(device) != "cpu" else "cpu")
        dist.all_reduce(t)
        sums = [float(v) for v in t.tolist()]
    return PerplexityResult(sums[0], int(sums[1]), int(sums[2]) if num_bytes is not None else None)


def rolling_windows(ids: Sequence[int], seq_len: int, batch_size: int = 8,
                    bos_id: int | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Cover a token sequence with disjoint prediction windows of at most `seq_len` tokens.

    Every token is predicted exactly once, each from the tokens before it in its window (no overlap,
    as lm-eval's rolling loglikelihood with context length = window). With `bos_id`, it is prepended
    so the first token is predicted too; otherwise the first token is context only.
    The last window is shorter, so it is yielded alone; full windows come `batch_size` at a time.

    Yields:
        (idx, targets), each (b, t) int64 with t <= seq_len.
    """
    ids = ([bos_id] if bos_id is not None else []) + list(ids)
    full: list[tuple[list[int], list[int]]] = []
    for start in range(0, max(len(ids) - 1, 0), seq_len):
        chunk = ids[start:start + seq_len + 1]
        x, y = chunk[:-1], chunk[1:]
        if len(x) < seq_len:  # the last window: flush full ones first, keeping text order
            if full:
                yield torch.tensor([a for a, _ in full]), torch.tensor([b for _, b in full])
                full = []
            yield torch.tensor([x]), torch.tensor([y])
            continue
        full.append((x, y))
        if len(full) == batch_size:
            yield torch.tensor([a for a, _ in full]), torch.tensor([b for _, b in full])
            full = []
    if full:
        yield torch.tensor([a for a, _ in full]), torch.tensor([b for _, b in full])


def perplexity_of_text(model: Any, text: str, encode: Callable[[str], list[int]], seq_len: int, *,
                       batch_size: int = 8, bos_id: int | None = None,
                       decode: Callable[[list[int]], str] | None = None,
                       device: torch.device | str | None = None) -> PerplexityResult:
    """Perplexity and bits per byte of a causal LM on one text.

    Args:
        model: as in `token_nll`.
        text: the held-out text.
        encode: text -> token ids (e.g. `raybig.tokenizer.get_tokenizer(name).encode`).
        seq_len: window length in tokens (at most the model's context length).
        batch_size: full windows per forward pass.
        bos_id: prepended so the first token is scored too (e.g. GPT-2's `<|endoftext|>`); without it
            the first token is context only and its bytes are left out of the byte count, which then
            needs `decode` (ids -> text) unless the tokenizer is bytes (one token = one byte).
        decode: token ids -> text, to count the unscored first token's bytes (see `bos_id`).
        device: as in `evaluate_perplexity`.

    Returns:
        A `PerplexityResult` whose `num_bytes` counts exactly the scored text's UTF-8 bytes.
    """
    ids = encode(text)
    n_bytes = len(text.encode("utf-8"))
    if bos_id is None and ids:
        first = len(decode([ids[0]]).encode("utf-8")) if decode is not None else 1
        n_bytes -= first
    return evaluate_perplexity(model, rolling_windows(ids, seq_len, batch_size, bos_id),
                               num_bytes=n_bytes, device=device, all_reduce=False)
