"""Spec -> DeepSpeed config. Pure functions (no torch): the worker passes what it found (`on_cuda`)."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raybig.spec.models import TrainLoopSpec, TrainSpec


def resolve_precision(spec: TrainSpec, on_cuda: bool | None = None,
                      capability: tuple[int, int] | None = None) -> str:
    """The precision to train in, resolving 'auto'.

    'auto' is fp32 on CPU; on CUDA bf16 where the GPU computes it
    natively (compute capability 8.0 or above: Ampere, Hopper, ...), else fp16 with loss scaling.

    Args:
        spec: the train spec.
        on_cuda: whether the worker runs on a CUDA device (the worker probes torch and passes it);
            None assumes CUDA exactly when the spec asks for GPUs.
        capability: the GPU's (major, minor) compute capability; None (not known, e.g. at validate
            time) assumes bf16.
    """
    if spec.deepspeed.precision != "auto":
        return spec.deepspeed.precision
    on_cuda = spec.resources.gpus_per_worker > 0 if on_cuda is None else on_cuda
    if not on_cuda:
        return "fp32"
    return "bf16" if capability is None or tuple(capability) >= (8, 0) else "fp16"


def schedule_ratio(t: TrainLoopSpec, i: int) -> float:
    """The learning rate, as a fraction of `t.lr`, that DeepSpeed sets after `i` scheduler steps.

    `i` is the scheduler's `last_batch_iteration` (after optimizer step k it is k - 1, and the rate it
    sets is used by step k + 1). Without `t.schedule_from`: WarmupCosineLR's linear warmup over
    max(2, warmup) steps, then a cosine down to `min_lr_ratio` at `steps`, clamped there. With it
    (a resumed run whose `steps` changed): `ratio` up to its `step`, then a cosine from `ratio` down
    to `min_lr_ratio` at `steps` (`build_ds_config` expresses that with WarmupCosineLR's own knobs).
    """
    m = t.min_lr_ratio
    f = t.schedule_from
    if f is not None:
        if i <= f.step:
            return f.ratio
        progress = min(1.0, (i - f.step) / max(1, t.steps - f.step))
        return m + (f.ratio - m) * (1 + math.cos(math.pi * progress)) / 2
    w = max(2, t.warmup)
    if i < w:
        return max(0, i) / w
    progress = min(1.0, (i - w + 1) / max(1, t.steps - w))
    return m + (1 - m) * (1 + math.cos(math.pi * progress)) / 2


def _scheduler(t: TrainLoopSpec) -> tuple[float, dict[str, Any]]:
    """(the optimizer's base lr, WarmupCosineLR's params) for `schedule_ratio`'s schedule."""
    f = t.schedule_from
    if f is None:
        return t.lr, {"total_num_steps": t.steps,
                      "warmup_num_steps": max(1, t.warmup),  # DeepSpeed refuses 0 (short runs default to it)
                      "warmup_type": "linear", "warmup_min_ratio": 0.0, "cos_min_ratio": t.min_lr_ratio}
    # Continued: base lr x ratio; "warmup" of ratio 1 through step f.step (its min ratio is 1), then
    # WarmupCosineLR's cosine phase (i - w + 1) / (total - w) = (i - f.step) / (steps - f.step), from
    # 1 down to cos_min_ratio = min_lr_ratio / ratio (above 1 when the floor is higher: then it rises).
    r = max(f.ratio, 1e-12)
    return t.lr * f.ratio, {"total_num_steps": max(t.steps, f.step + 1) + 1, "warmup_num_steps": f.step + 1,
                            "warmup_type": "linear", "warmup_min_ratio": 1.0,
                            "cos_min_ratio": t.min_lr_ratio / r if f.ratio > 0 else 0.0}


def _generated(spec: TrainSpec, on_cuda: bool | None, capability: tuple[int, int] | None = None) -> dict[str, Any]:
    t, ds = spec.train, spec.deepspeed
    precision = resolve_precision(spec, on_cuda, capability)
    gpu = bool(spec.resources.gpus_per_worker > 0 if on_cuda is None else on_cuda)
    offload_opt = ds.offload_optimizer != "none"
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        # Overlapping gradient reduction with backward needs CUDA streams; on CPU it only costs memory.
        zero.update(overlap_comm=gpu, contiguous_gradients=True, reduce_bucket_size=5e7)
    if offload_opt:
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": bool(on_cuda)}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": bool(on_cuda)}
    if ds.zero_stage == 3:
        # Needed to export consolidated weights at the end of training.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    base_lr, sched = _scheduler(t)
    opt_params: dict[str, Any] = {"lr": base_lr, "betas": list(t.betas), "eps": 1e-8,
                                  "weight_decay": t.weight_decay}
    if not offload_opt:
        opt_params["torch_adam"] = True  # no JIT-built fused_adam; offload needs cpu_adam instead
        if gpu:
            opt_params["fused"] = True  # torch's own fused CUDA AdamW (one kernel; nothing to compile)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": opt_params},
        "scheduler": {"type": "WarmupCosineLR", "params": sched},  # see schedule_ratio
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0 = dynamic loss scaling, which fp16's narrow range needs.
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1} if precision == "fp16" else {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


# Generated keys that belong to a spec field: `deepspeed.extra` may not contradict them.
OWNED: dict[tuple[str, ...], str] = {
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("train_batch_size",): "train.micro_batch_size × train.grad_accum × resources.workers",
    ("gradient_clipping",): "train.grad_clip",
    ("zero_optimization", "stage"): "deepspeed.zero_stage",
    ("zero_optimization", "offload_optimizer"): "deepspeed.offload_optimizer",
    ("zero_optimization", "offload_param"): "deepspeed.offload_param",
    ("optimizer", "params", "lr"): "train.lr",
    ("optimizer", "params", "weight_decay"): "train.weight_decay",
    ("optimizer", "params", "betas"): "train.betas",
    ("scheduler", "params", "total_num_steps"): "train.steps",
    ("scheduler", "params", "warmup_num_steps"): "train.warmup_steps",
    ("bf16", "enabled"): "deepspeed.precision",
    ("fp16", "enabled"): "deepspeed.precision",
}


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return _MISSING
        d = d[p]
    return d


_MISSING = object()


def check_extra(spec: TrainSpec) -> list[tuple[str, str]]:
    """(sub path under deepspeed.extra, message) for every extra key that contradicts the spec."""
    extra = spec.deepspeed.extra
    if not extra:
        return []
    gen = _generated(spec, None)
    gen["train_batch_size"] = spec.global_batch()
    out = []
    for path, owner in OWNED.items():
        want, have = _get(extra, path), _get(gen, path)
        if want is _MISSING:
            continue
        if have is _MISSING or want != have:
            out.append((".".join(path), f"sets {want!r}, which contradicts {owner} "
                        f"(generated {have if have is not _MISSING else 'nothing'}); set {owner} instead"))
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `over` merged in, mappings recursively."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(spec: TrainSpec, on_cuda: bool | None = None,
                    capability: tuple[int, int] | None = None) -> dict[str, Any]:
    """The DeepSpeed config for this spec; `deepspeed.extra` merged on top.

    Args:
        spec: the train spec.
        on_cuda: whether the worker trains on a CUDA GPU (None: whether the spec asks for GPUs).
        capability: the GPU's compute capability, for `precision: auto` (see `resolve_precision`).
    """
    return deep_merge(_generated(spec, on_cuda, capability), spec.deepspeed.extra)
