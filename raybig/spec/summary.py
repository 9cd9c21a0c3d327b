"""Human-readable summaries shared by the CLI commands."""

from __future__ import annotations

from typing import Any


def validate_summary(spec: Any) -> dict[str, Any]:
    """What `raybig validate` prints: kind, name, and for train specs the ZeRO memory estimate."""
    summary: dict[str, Any] = {"kind": spec.kind, "name": getattr(spec, "name", ""), "lines": []}
    if spec.kind == "train":
        summary.update(train_memory_summary(spec))
    elif spec.kind == "sweep":
        from raybig.spec.sweep import summary_lines

        summary["lines"] = summary_lines(spec)
    return summary


def train_memory_summary(spec: Any) -> dict[str, Any]:
    from raybig.train.memory import estimate, human

    r, ds = spec.resources, spec.deepspeed
    try:
        est = estimate(spec)
    except Exception as e:  # a plug-in that cannot build on the meta device
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
