"""Human-readable summaries shared by the CLI commands."""

from __future__ import annotations

from typing import Any

from raybig.spec.job import JobSpec
from raybig.spec.models import TrainSpec
from raybig.spec.sweep import SweepSpec


def validate_summary(spec: JobSpec) -> dict[str, Any]:
    """What `raybig validate` prints: kind, name, and for train specs the ZeRO memory estimate."""
    summary: dict[str, Any] = {"kind": spec.kind, "name": spec.name, "lines": []}
    match spec:
        case TrainSpec():
            summary.update(train_memory_summary(spec))
        case SweepSpec():
            summary["lines"] = summary_lines(spec)
            summary["warnings"] = train_memory_summary(spec.base).get("warnings", [])
    return summary


def train_memory_summary(spec: TrainSpec) -> dict[str, Any]:
    """The ZeRO memory estimate of a train spec: numbers (bytes) and printable lines."""
    from raybig.spec.memory import EstimateUnavailable, estimate, human

    r, ds = spec.resources, spec.deepspeed
    if spec.task == "classification":  # a built-in classifier: its size follows from the data's shape
        c = spec.classifier
        arch, hidden, data = (c.arch, c.hidden, c.dataset) if c else ("mlp", [128, 64], "digits")
        line = f"classifier: {arch} (hidden {', '.join(map(str, hidden))}) on {data}"
        if arch == "mlp" and data == "digits":  # 8x8 inputs, 10 classes
            widths = [64, *hidden, 10]
            n = sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))
            line += f": {n:,} parameters"
        return {"lines": [f"{line}; ZeRO-{ds.zero_stage}, {r.workers} workers"]}
    try:
        est = estimate(spec)
    except EstimateUnavailable as e:  # a plug-in: its size is known only once built
        return {"lines": [f"memory estimate unavailable: {e}"]}
    m = spec.model
    src = (f"Hugging Face {m.hf}" if m.hf else "Hugging Face config (random init)" if m.is_hf
           else "raybig GPT")
    lines = [
        f"model: {est.params:,} parameters ({src}); ZeRO-{est.stage}, {est.precision}, {r.workers} workers",
        f"model state per worker: params {human(est.param_bytes)} + grads {human(est.grad_bytes)} "
        f"+ optimizer {human(est.optim_bytes)} = {human(est.total)}",
    ]
    if est.trainable is not None and est.trainable != est.params:
        lines.insert(1, f"LoRA r={spec.finetune.r} on {spec.lora_targets()}: {est.trainable:,} trainable "
                        f"parameters ({100 * est.trainable / max(est.params, 1):.2f}%); only they have "
                        "gradients and optimizer state")
    lines.insert(1, f"tokenizer: {spec.tokenizer_kind()}")
    if est.offloaded_bytes:
        lines.append(f"  of which offloaded to host RAM: {human(est.offloaded_bytes)} "
                     f"(offload_optimizer={ds.offload_optimizer}, offload_param={ds.offload_param})")
    warnings = list(spec.data.deprecations())
    if r.memory_per_worker:
        lines.append(f"fits memory_per_worker {human(r.memory_per_worker)}")
    else:
        warnings += machine_memory_warnings(spec)
    return {"params": est.params, "trainable_params": est.trainable, "bytes_per_worker": est.total,
            "offloaded_bytes": est.offloaded_bytes, "lines": lines, "warnings": warnings}


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def machine_memory_warnings(spec: TrainSpec, total: int | None = None) -> list[str]:
    """A warning when all workers' model state (host side) exceeds this machine's memory.

    Only without `resources.memory_per_worker` (with it, validation itself checks the fit). The
    advice names only changes that shrink the host memory all workers need at this ZeRO stage.

    Args:
        spec: the train spec.
        total: the machine's memory in bytes (default: this machine's, `machine_memory()`).
    """
    from raybig.spec.memory import (
        EstimateUnavailable,
        estimate,
        host_bytes_per_worker,
        human,
        shrinking_fixes,
    )

    total = machine_memory() if total is None else total
    if not total or spec.resources.memory_per_worker:
        return []
    try:
        est = estimate(spec)
        per = host_bytes_per_worker(spec)
    except EstimateUnavailable:
        return []
    n = spec.resources.workers
    if per * n <= total:
        return []
    fixes = shrinking_fixes(spec, lambda s: host_bytes_per_worker(s) * s.resources.workers)
    return [f"model state needs about {human(per)} per worker x {n} workers = {human(per * n)}, more than "
            f"this machine's {human(total)} (ZeRO-{est.stage}, {est.precision}); on one machine try "
            f"{', or '.join(fixes)}; or set resources.memory_per_worker for a cluster's nodes"]


def summary_lines(spec: SweepSpec) -> list[str]:
    """What `raybig validate` prints for a sweep."""
    b = spec.base
    sched = (f"ASHA on {spec.time_attr} (grace {spec.grace_period}, rf {spec.reduction_factor:g}, "
             f"max_t {spec.horizon()})" if spec.scheduler == "asha" else "no early stopping")
    lines = [f"{spec.total_trials()} trials ({spec.algorithm}, grid of {spec.grid_size()}), "
             f"{spec.max_concurrent_trials} at a time, {spec.mode} {spec.metric}; {sched}",
             f"each trial: {b.resources.workers} workers x {b.resources.cpus_per_worker:g} CPU, "
             f"{b.train.steps} steps, ZeRO-{b.deepspeed.zero_stage}",
             *[f"  {k}: {d.kind} {getattr(d, d.kind)!r}" for k, d in spec.search.items()]]
    return lines + [f"base {line}" for line in train_memory_summary(b).get("lines", [])]
