"""Moved to `raybig.spec.memory` (pure: the spec layer uses it at validate time); re-exported."""

from raybig.spec.memory import (
    EstimateUnavailable,
    MemoryEstimate,
    check_fit,
    count_params,
    estimate,
    human,
    model_state_bytes,
)

__all__ = ["EstimateUnavailable", "MemoryEstimate", "check_fit", "count_params", "estimate", "human",
           "model_state_bytes"]
