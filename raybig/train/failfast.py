"""Stop a Ray Train v2 run at once on a worker error that a worker-group restart cannot fix.

Ray Train v2 (2.60) retries every `WorkerGroupError` up to `FailureConfig.max_failures`: its
`DefaultFailurePolicy` has no notion of a non-retryable worker error, and the trainer builds that
policy itself (`create_failure_policy`), so it cannot be swapped. What it does offer are controller
callbacks, run in the controller actor: `after_worker_group_poll_status` sees each rank's exception
before the policy decides, and an exception raised from `before_controller_execute_failure_decision`
becomes a `ControllerError` that the policy does not retry (only worker-group start-up failures are
retryable controller errors). `FailFast` uses exactly that pair: a deterministic error
(`raybig.train.causes.is_deterministic`: a missing file, a raybig data/spec error, an incomplete
checkpoint, a missing plug-in module) turns the pending RETRY into a RAISE, and `fit()` raises a
`ControllerError` whose `controller_failure` is a `NotRetried` carrying the root cause line.
"""

from __future__ import annotations

from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.failure_handling import FailureDecision

from raybig.train.causes import is_deterministic, root_cause


class NotRetried(RuntimeError):
    """Raised in the controller to end a run whose worker error a restart cannot fix."""


class FailFast(ControllerCallback, WorkerGroupCallback):
    """A Ray Train callback: no worker-group restart for a deterministic worker error."""

    def __init__(self) -> None:
        self.cause: str | None = None

    def after_worker_group_poll_status(self, worker_group_status: Any) -> None:
        """Remember the first deterministic worker error, by rank (lowest first)."""
        for rank, err in sorted((worker_group_status.errors or {}).items()):
            if is_deterministic(err):
                self.cause = f"{root_cause(err)} (rank {rank})"
                return

    def before_controller_execute_failure_decision(self, failure_decision: Any) -> None:
        """Turn the policy's RETRY into a failure when the error was deterministic."""
        if failure_decision == FailureDecision.RETRY and self.cause:
            raise NotRetried(self.cause)
