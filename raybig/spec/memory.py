"""ZeRO model-state memory per worker, before anything starts.

ZeRO paper (Rajbhandari et al., Fig. 1), Ψ parameters, N data-parallel ranks.
Mixed precision (bf16/fp16): params 2Ψ, grads 2Ψ, optimizer K=12Ψ (fp32 master 4Ψ + Adam m,v 8Ψ):
  stage 0: 16Ψ   stage 1: 4Ψ + 12Ψ/N   stage 2: 2Ψ + 14Ψ/N   stage 3: 16Ψ/N
fp32 (CPU): params 4Ψ, grads 4Ψ, optimizer K=8Ψ (Adam m,v; no separate master copy):
  stage 0: 16Ψ   stage 1: 8Ψ + 8Ψ/N    stage 2: 4Ψ + 12Ψ/N   stage 3: 16Ψ/N
Optimizer offload moves the K term (and, at stage ≥ 2, the gradient shard) to host memory;
parameter offload (stage 3) moves the parameter shard too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raybig.spec.models import TrainSpec


class EstimateUnavailable(ValueError):
    """No parameter count without building the model (a `model.target` plug-in of unknown shape)."""


@dataclass
class MemoryEstimate:
    """ZeRO model state per worker, in bytes (see the module docstring for the formulas)."""

    params: int
    precision: str
    stage: int
    workers: int
    param_bytes: float
    grad_bytes: float
    optim_bytes: float
    offloaded_bytes: float  # part of the above that lives in host RAM because of offload

    @property
    def total(self) -> float:
        """Bytes of model state per worker, wherever it lives."""
        return self.param_bytes + self.grad_bytes + self.optim_bytes

    @property
    def device(self) -> float:
        """Bytes of model state per worker left on the device after offload."""
        return self.total - self.offloaded_bytes


def model_state_bytes(psi: int, stage: int, n: int, precision: str,
                      offload_optimizer: bool = False, offload_param: bool = False) -> MemoryEstimate:
    """Bytes of params, grads and optimizer state per rank for `psi` parameters over `n` ranks."""
    half = precision in ("bf16", "fp16")
    p_b, g_b, k_b = (2, 2, 12) if half else (4, 4, 8)
    params = p_b * psi / (n if stage >= 3 else 1)
    grads = g_b * psi / (n if stage >= 2 else 1)
    optim = k_b * psi / (n if stage >= 1 else 1)
    off = 0.0
    if offload_optimizer:
        off += optim + (grads if stage >= 2 else 0.0)
    if offload_param and stage == 3:
        off += params
    return MemoryEstimate(psi, precision, stage, n, params, grads, optim, off)


def count_params(spec: TrainSpec) -> int:
    """Parameters of the spec's GPT, from its shape alone (no torch, nothing allocated).

    Raises:
        EstimateUnavailable: for a `model.target` plug-in, whose shape only its code knows.
    """
    m = spec.model
    if m.target is not None:
        raise EstimateUnavailable(f"model.target {m.target!r} is a plug-in; its size is known only once "
                                  "it is built (on the workers)")
    from raybig.tokenizer import BYTE_VOCAB

    s = m.gpt_shape()
    d, L = s["n_embd"], s["n_layer"]
    vocab = m.vocab_size or BYTE_VOCAB
    per_block = 12 * d * d + (13 * d if m.bias else 2 * d)  # 4 Linear + 2 LayerNorm
    return vocab * d + s["block_size"] * d + L * per_block + d * (2 if m.bias else 1)


def estimate(spec: TrainSpec) -> MemoryEstimate:
    """Model-state bytes per worker for this spec. Raises EstimateUnavailable for plug-ins."""
    from raybig.spec.deepspeed import resolve_precision

    ds = spec.deepspeed
    return model_state_bytes(count_params(spec), ds.zero_stage, spec.resources.workers,
                             resolve_precision(spec), ds.offload_optimizer != "none",
                             ds.offload_param != "none")


def human(n: float) -> str:
    """Bytes as text with a binary unit: `1536` -> `1.5 KiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_fit(spec: TrainSpec) -> str | None:
    """A message naming the fixes if the estimate exceeds resources.memory_per_worker."""
    limit = spec.resources.memory_per_worker
    if limit is None:
        return None
    try:
        est = estimate(spec)
    except EstimateUnavailable:  # a plug-in: nothing to check here
        return None
    # On CPU the device and the host are the same RAM; on GPU only offloaded state is host-side.
    need = est.total if spec.resources.gpus_per_worker == 0 else est.offloaded_bytes
    if need <= limit:
        return None
    fixes = []
    if spec.deepspeed.zero_stage < 3:
        fixes.append(f"deepspeed.zero_stage: {spec.deepspeed.zero_stage + 1}")
    fixes.append(f"resources.workers: {spec.resources.workers * 2}")
    if spec.resources.gpus_per_worker > 0 and spec.deepspeed.offload_optimizer == "none":
        fixes.append("deepspeed.offload_optimizer: cpu")
    fixes.append("a smaller model")
    return (f"model state needs about {human(need)} per worker (Ψ={est.params:,} params, "
            f"ZeRO-{est.stage}, {est.precision}, N={est.workers}) but memory_per_worker is "
            f"{human(limit)}; try {', or '.join(fixes)}")
