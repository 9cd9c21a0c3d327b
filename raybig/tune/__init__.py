"""Sweeps: Ray Tune over distributed DeepSpeed train runs (`kind: sweep`)."""

from __future__ import annotations

from typing import Any


def run_sweep(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) a sweep; see `raybig.tune.runner.run_sweep` (imported on first use)."""
    from raybig.tune.runner import run_sweep as _run

    return _run(*args, **kwargs)


__all__ = ["run_sweep"]
