"""`kind: probe`: a cluster smoke-test job that holds a gang of resources for a while.

Why a kind of its own: it checks a cluster and the scheduler (queueing, gang admission, retries,
stop) in seconds, without training anything. It reserves exactly what a train job with the same
`resources:` would (one placement-group bundle per worker, `ResourcesSpec.bundle()`), runs a tiny
task in each bundle to prove placement, holds them for `seconds`, then frees them. `fail_attempts`
makes the first N attempts fail, to see retries work. The runner is `raybig.scheduler.probe`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raybig.spec.base import NAME_RE, Name, QueuedSpec
from raybig.spec.models import ResourcesSpec


class ProbeSpec(QueuedSpec):
    """A probe job: hold `resources` for `seconds` (optionally fail the first attempts)."""

    kind: Literal["probe"] = "probe"
    name: Name = Field(..., pattern=NAME_RE, description="Job name.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    seconds: float = Field(2.0, ge=0.0, le=86400, description="How long to hold the gang.")
    fail_attempts: int = Field(0, ge=0, le=100, description="Fail the first N attempts (retry drills).")
