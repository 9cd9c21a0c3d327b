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
            from raybig.spec.sweep import summary_lines

            summary["lines"] = summary_lines(spec)
    return summary


def train_memory_summary(spec: TrainSpec) -> dict[str, Any]:
    """The ZeRO memory estimate of a train spec: numbers (bytes) and printable lines."""
    from raybig.spec.memory import EstimateUnavailable, estimate, human

    r, ds = spec.resources, spec.deepspeed
    try:
        est = estimate(spec)
    except EstimateUnavailable as e:  # a plug-in: its size is known only once built
        return {"lines": [f"memory estimate unavailable: {e}"]}
    lines = [
        f"model: {est.params:,} parameters; ZeRO-{est.stage}, {est.precision}, {r.workers} workers",
        f"model state per worker: params {human(est.param_bytes)} + grads {human(est.grad_bytes)} "
        f"+ optimizer {human(est.optim_bytes)} = {human(est.total)}",
    ]
    if est.offloaded_bytes:
        lines.append(f"  of which offloaded to host RAM: {human(est.offloaded_bytes)} "
                     f"(offload_optimizer={ds.offload_optimizer}, offload_param={ds.offload_param})")
    if r.memory_per_worker:
        lines.append(f"fits memory_per_worker {human(r.memory_per_worker)}")
    return {"params": est.params, "bytes_per_worker": est.total, "offloaded_bytes": est.offloaded_bytes,
            "lines": lines}
