"""ZeRO model-state memory per worker, before anything starts.

ZeRO paper (Rajbhandari et al., Fig. 1), Ψ parameters, N data-parallel ranks.
Mixed precision (bf16/fp16): params 2Ψ, grads 2Ψ, optimizer K=12Ψ (fp32 master 4Ψ + Adam m,v 8Ψ):
  stage 0: 16Ψ   stage 1: 4Ψ + 12Ψ/N   stage 2: 2Ψ + 14Ψ/N   stage 3: 16Ψ/N
fp32 (CPU): params 4Ψ, grads 4Ψ, optimizer K=8Ψ (Adam m,v; no separate master copy):
  stage 0: 16Ψ   stage 1: 8Ψ + 8Ψ/N    stage 2: 4Ψ + 12Ψ/N   stage 3: 16Ψ/N
Optimizer offload moves the K term (and, at stage ≥ 2, the gradient shard) to host memory;
parameter offload (stage 3) moves the parameter shard too.
LoRA: only the adapter's Ψ_t parameters have gradients and optimizer state, so the grads and K
terms use Ψ_t while the params term keeps Ψ + Ψ_t (the frozen weights stay in the training dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    trainable: int | None = None  # parameters with gradients and optimizer state (LoRA: the adapter's)

    @property
    def total(self) -> float:
        """Bytes of model state per worker, wherever it lives."""
        return self.param_bytes + self.grad_bytes + self.optim_bytes

    @property
    def device(self) -> float:
        """Bytes of model state per worker left on the device after offload."""
        return self.total - self.offloaded_bytes


def model_state_bytes(psi: int, stage: int, n: int, precision: str,
                      offload_optimizer: bool = False, offload_param: bool = False,
                      trainable: int | None = None) -> MemoryEstimate:
    """Bytes of params, grads and optimizer state per rank for `psi` parameters over `n` ranks.

    Args:
        psi: parameters (Ψ).
        stage: ZeRO stage 0-3.
        n: data-parallel ranks (N).
        precision: fp32, bf16 or fp16.
        offload_optimizer: optimizer state (and stage >= 2 gradients) in host RAM.
        offload_param: the parameter shard in host RAM (stage 3).
        trainable: parameters that get gradients and optimizer state (a LoRA adapter's); None means
            all `psi`. The adapter's own parameters are counted in `psi` by the caller.
    """
    half = precision in ("bf16", "fp16")
    p_b, g_b, k_b = (2, 2, 12) if half else (4, 4, 8)
    psi_t = psi if trainable is None else trainable
    params = p_b * psi / (n if stage >= 3 else 1)
    grads = g_b * psi_t / (n if stage >= 2 else 1)
    optim = k_b * psi_t / (n if stage >= 1 else 1)
    off = 0.0
    if offload_optimizer:
        off += optim + (grads if stage >= 2 else 0.0)
    if offload_param and stage == 3:
        off += params
    return MemoryEstimate(psi, precision, stage, n, params, grads, optim, off, psi_t)


def model_shapes(spec: TrainSpec) -> dict[str, tuple[int, ...]]:
    """`{parameter name: shape}` of the spec's model, without torch.

    From safetensors headers for `model.hf`, the config for `model.hf_config`, the GPT shape
    otherwise (a tied head is not listed).

    Raises:
        EstimateUnavailable: for a `model.target` plug-in, whose shape only its code knows.
    """
    m = spec.model
    if m.is_hf:
        from raybig.spec.hf_params import hf_model_info

        return dict(hf_model_info(m.hf, m.hf_config, m.trust_remote_code)["shapes"])
    if m.target is not None:
        raise EstimateUnavailable(f"model.target {m.target!r} is a plug-in; its size is known only once "
                                  "it is built (on the workers)")
    from raybig.spec.hf_params import raybig_gpt_shapes

    s = m.gpt_shape()
    return raybig_gpt_shapes(s["n_layer"], s["n_embd"], spec.model_vocab(), s["block_size"], m.bias)


def count_params(spec: TrainSpec) -> int:
    """Parameters of the spec's model (a tied head counted once), from shapes alone (no torch).

    Raises:
        EstimateUnavailable: for a `model.target` plug-in, whose shape only its code knows.
    """
    return sum(math.prod(s) for s in model_shapes(spec).values())


def trainable_params(spec: TrainSpec) -> int | None:
    """Parameters with gradients: the LoRA adapter's for `finetune.method: lora`, else None (all).

    Raises:
        EstimateUnavailable: a plug-in. raybig.spec.hf_params.LoraTargetError: targets match nothing.
    """
    if spec.finetune.method != "lora":
        return None
    from raybig.spec.hf_params import lora_trainable_params

    return lora_trainable_params(model_shapes(spec), spec.finetune.r, spec.lora_targets())


def estimate(spec: TrainSpec) -> MemoryEstimate:
    """Model-state bytes per worker for this spec. Raises EstimateUnavailable for plug-ins."""
    from raybig.spec.deepspeed import resolve_precision

    ds = spec.deepspeed
    psi = count_params(spec)
    lora = trainable_params(spec)
    return model_state_bytes(psi + (lora or 0), ds.zero_stage, spec.resources.workers,
                             resolve_precision(spec), ds.offload_optimizer != "none",
                             ds.offload_param != "none", trainable=lora)


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
    fixes = shrinking_fixes(spec, host_bytes_per_worker)
    return (f"model state needs about {human(need)} per worker (Ψ={est.params:,} params, "
            f"ZeRO-{est.stage}, {est.precision}, N={est.workers}) but memory_per_worker is "
            f"{human(limit)}; try {', or '.join(fixes)}")


def host_bytes_per_worker(spec: TrainSpec) -> float:
    """Host RAM one worker's model state takes: all of it on CPU, the offloaded part on GPU."""
    est = estimate(spec)
    return est.total if spec.resources.gpus_per_worker == 0 else est.offloaded_bytes


def _with(spec: TrainSpec, section: str, **values: object) -> TrainSpec:
    return spec.model_copy(update={section: getattr(spec, section).model_copy(update=values)})


def shrinking_fixes(spec: TrainSpec, need: Callable[[TrainSpec], float]) -> list[str]:
    """Spec changes that lower `need(spec)` at this spec's stage, as `path: value (new need)`.

    Only changes that shrink the measured bytes are named (e.g. more workers never help at ZeRO-0,
    where every worker holds everything), followed by "a smaller model".
    """
    base = need(spec)
    ds, r = spec.deepspeed, spec.resources
    cands: list[tuple[str, TrainSpec]] = []
    for stage in sorted({min(3, ds.zero_stage + 1), 3}):
        if stage > ds.zero_stage:
            cands.append((f"deepspeed.zero_stage: {stage}", _with(spec, "deepspeed", zero_stage=stage)))
    cands.append((f"resources.workers: {r.workers * 2}", _with(spec, "resources", workers=r.workers * 2)))
    if r.workers > 1:
        cands.append((f"resources.workers: {r.workers // 2}", _with(spec, "resources", workers=r.workers // 2)))
    if ds.zero_stage >= 1 and ds.offload_optimizer == "none":
        cands.append(("deepspeed.offload_optimizer: cpu", _with(spec, "deepspeed", offload_optimizer="cpu")))
    if ds.zero_stage == 3 and ds.offload_param == "none":
        cands.append(("deepspeed.offload_param: cpu", _with(spec, "deepspeed", offload_param="cpu")))
    out = []
    for label, variant in cands:
        try:
            v = need(variant)
        except EstimateUnavailable:
            continue
        if v < base * 0.999:
            out.append(f"{label} ({human(v)})")
    return [*out, "a smaller model"]
