"""What a raybig job carries in Ray's job table: its metadata (the durable queue record).

Ray's job metadata is a flat str->str map, written once at submission. It holds everything the
scheduler needs to rebuild the queue after a restart: priority, submission time, the gang demand,
the owner and the spec hash. The frozen spec itself travels in the job's runtime_env env vars.
"""

from __future__ import annotations

import json
import os
from enum import Enum
from typing import Any

from raybig.scheduler.policy import Demand, Job, JobState
from raybig.spec.base import QueuedSpec

MARK = "raybig"
NAMESPACE = "raybig"
ACTOR_NAME = "raybig-scheduler"
STATE_PREFIX = "[raybig] state "      # holder log lines the CLI reads for status
METRICS_PREFIX = "[raybig] metrics "


class Phase(str, Enum):
    """What a job's holder tells the scheduler actor in each heartbeat."""

    WAITING = "waiting"    # asks to be admitted
    RUNNING = "running"    # was admitted (maybe before a scheduler restart) and runs
    BACKOFF = "backoff"    # a failed attempt pausing before its retry: asks for nothing


def driver_cpus() -> float:
    """CPU the scheduler books for each job's driver (Ray itself reserves 0 so a queued holder is free)."""
    return float(os.environ.get("RAYBIG_DRIVER_CPUS", "0.5"))


def demand_of(spec: Any) -> Demand:
    """The gang a spec needs: workers x per-worker resources, plus the driver."""
    r = getattr(spec, "resources", None)
    driver = {"CPU": driver_cpus()}
    if r is None or not hasattr(r, "workers"):
        return Demand.of(0, {}, driver)
    return Demand.of(int(r.workers), r.bundle(), driver)


def metadata_for(spec: Any, spec_hash: str, user: str, submitted_at: float) -> dict[str, str]:
    """The job-table metadata (the durable queue record) written once at submission."""
    return {
        MARK: "1",
        "raybig_kind": str(spec.kind),
        "raybig_name": str(spec.name),
        "raybig_priority": str(priority_of(spec)),
        "raybig_max_retries": str(spec.max_retries if isinstance(spec, QueuedSpec) else 0),
        "raybig_demand": json.dumps(demand_of(spec).to_json(), separators=(",", ":")),
        "raybig_spec_hash": spec_hash,
        "raybig_user": user,
        "raybig_submitted_at": f"{submitted_at:.6f}",
    }


def priority_of(spec: Any) -> int:
    """The scheduler priority of a spec (0 for kinds that are not queued, like serve)."""
    return spec.priority if isinstance(spec, QueuedSpec) else 0


def is_raybig(metadata: dict[str, str] | None) -> bool:
    """Whether a job's metadata marks it as a raybig job."""
    return metadata is not None and metadata.get(MARK) == "1"


def job_from_metadata(job_id: str, md: dict[str, str]) -> Job:
    """The scheduler's `Job` rebuilt from its job-table metadata (not yet ready: no heartbeat seen)."""
    return Job(job_id=job_id, priority=int(md.get("raybig_priority", "0")),
               submitted_at=float(md.get("raybig_submitted_at", "0")),
               demand=Demand.from_json(json.loads(md.get("raybig_demand", "[]"))),
               user=md.get("raybig_user", ""), ready=False)


def state_line(state: JobState, **fields: Any) -> str:
    """The log line a holder prints for each state change (`STATE_PREFIX` + JSON)."""
    return STATE_PREFIX + json.dumps({"state": state.value, **fields}, default=str)


def last_state(logs: str) -> dict[str, Any] | None:
    """The holder's latest self-reported state and metrics, parsed from its log text.

    Returns:
        The last state line's fields, `state` as a `JobState`, plus `metrics` (latest values of every
        metrics line) when there were any; None when the holder printed no state yet.
    """
    state: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    for line in logs.splitlines():
        i = line.find(STATE_PREFIX)
        if i >= 0:
            try:
                state = json.loads(line[i + len(STATE_PREFIX):])
            except ValueError:
                pass
            continue
        i = line.find(METRICS_PREFIX)
        if i >= 0:
            try:
                metrics = {**(metrics or {}), **json.loads(line[i + len(METRICS_PREFIX):])}
            except ValueError:
                pass
    if state is None:
        return None
    try:
        state["state"] = JobState(state.get("state"))
    except ValueError:
        state["state"] = JobState.RUNNING  # a holder from another raybig version: it is alive
    if metrics:
        state["metrics"] = metrics
    return state
