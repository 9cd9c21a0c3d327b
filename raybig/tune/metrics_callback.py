"""Sweep metrics from the Tune driver: trials by state and the best metric so far.

A module of its own (not in raybig.metrics) because it subclasses Tune's Callback, and replicas and
workers that import raybig.metrics should not import Ray Tune. Module-level so Tune can pickle it.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback

from raybig.metrics import sweep_best, sweep_trials

STATES = ("pending", "running", "paused", "terminated", "error")


class SweepMetricsCallback(Callback):
    """Publishes `raybig_sweep_trials{sweep,state}` and `raybig_sweep_best_metric{sweep,metric}`."""

    def __init__(self, sweep: str, metric: str, mode: str):
        self.sweep, self.metric, self.mode = sweep, metric, mode
        self.best: float | None = None

    def _states(self, trials: list[Any]) -> None:
        counts = dict.fromkeys(STATES, 0)
        for t in trials:
            state = str(getattr(t, "status", "")).lower()
            counts[state] = counts.get(state, 0) + 1
        sweep_trials(self.sweep, counts)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        """Record the best metric so far and the trial counts."""
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            if self.best is None or (v < self.best if self.mode == "min" else v > self.best):
                self.best = float(v)
                sweep_best(self.sweep, self.metric, self.best)
        self._states(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Update the trial counts."""
        self._states(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Update the trial counts."""
        self._states(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Update the trial counts."""
        self._states(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Update the trial counts."""
        self._states(trials)
