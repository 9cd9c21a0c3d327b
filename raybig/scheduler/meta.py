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
BOARD_FILE = "raybig-queue.json"  # the scheduler's queue board, in its node's Ray log folder


class Phase(str, Enum):
    """What a job's holder tells the scheduler actor in each heartbeat."""

    WAITING = "waiting"    # asks to be admitted
    RUNNING = "running"    # was admitted (maybe before a scheduler restart) and runs
    BACKOFF = "backoff"    # a failed attempt pausing before its retry: asks for nothing


def driver_cpus() -> float:
    """CPU the scheduler books for each job's driver (Ray itself reserves 0 so a queued holder is free)."""
    return float(os.environ.get("RAYBIG_DRIVER_CPUS", "0.5"))


TRIAL_DRIVER = {"CPU": 0.01}  # a sweep trial's Tune function trainable (raybig.tune.runner)


def demand_of(spec: Any, workers: int | None = None) -> Demand:
    """The gang a spec needs: workers x per-worker resources, plus the driver.

    `workers` overrides `resources.workers` (a worker range admitted below its maximum).

    A sweep needs its driver plus `max_concurrent_trials` trial gangs at once (each: the trial's
    0.01-CPU trainable and its workers), so it is admitted only when they all fit and its trials
    never wait inside Ray. Where the search changes `resources.*`, each trial counts at the largest
    value searched.
    """
    from raybig.spec.sweep import SweepSpec

    driver = {"CPU": driver_cpus()}
    if isinstance(spec, SweepSpec):
        workers, bundle = _largest_trial(spec)
        per_trial = [bundle] * workers + [dict(TRIAL_DRIVER)]
        gang = per_trial * spec.max_concurrent_trials + [driver]
        return Demand.from_json([b for b in gang if any(v > 0 for v in b.values())])
    r = getattr(spec, "resources", None)
    if r is None or not hasattr(r, "workers"):
        return Demand.of(0, {}, driver)
    return Demand.of(int(r.workers if workers is None else workers), r.bundle(), driver)


def worker_range(spec: Any) -> tuple[int, int] | None:
    """(min, max) workers of a train spec whose `resources.workers` is a range, else None.

    After validation `resources.workers` is the maximum and `resources.min_workers` the minimum (None
    for a plain count).
    """
    from raybig.spec.sweep import SweepSpec

    r = getattr(spec, "resources", None)
    lo = getattr(r, "min_workers", None)
    if r is None or lo is None or isinstance(spec, SweepSpec) or int(lo) >= int(r.workers):
        return None
    return int(lo), int(r.workers)


def sizes_of(spec: Any) -> list[tuple[int, Demand]]:
    """A worker range's smaller gangs, largest first: (workers, demand) for max-1 down to min; else []."""
    rng = worker_range(spec)
    if rng is None:
        return []
    return [(n, demand_of(spec, n)) for n in range(rng[1] - 1, rng[0] - 1, -1)]


def least_demand_of(spec: Any) -> Demand:
    """The smallest gang a spec can start with (its range's minimum; else its only gang)."""
    sizes = sizes_of(spec)
    return sizes[-1][1] if sizes else demand_of(spec)


def preemptible_of(spec: Any) -> bool:
    """Whether the scheduler may preempt this spec's job (serving and other unqueued kinds: never)."""
    return spec.is_preemptible() if isinstance(spec, QueuedSpec) else False


def _largest_trial(spec: Any) -> tuple[int, dict[str, float]]:
    """(workers, one worker's bundle) of a sweep's largest trial: the base, at each searched maximum."""
    r = spec.base.resources
    top: dict[str, Any] = {}
    for field in ("workers", "cpus_per_worker", "gpus_per_worker", "memory_per_worker"):
        dist = spec.search.get(f"resources.{field}")
        values = [v for v in (dist.probe_values() if dist is not None else []) if isinstance(v, int | float)]
        if values:
            top[field] = max(values)
    if top:
        try:
            r = r.model_copy(update=top)
        except Exception:  # noqa: BLE001 - the base's own resources then
            pass
    return int(r.workers), r.bundle()


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
        "raybig_preemptible": "1" if preemptible_of(spec) else "0",
        **({"raybig_sizes": json.dumps([[n, d.to_json()] for n, d in sizes], separators=(",", ":"))}
           if (sizes := sizes_of(spec)) else {}),
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
               user=md.get("raybig_user", ""), ready=False, preemptible=md.get("raybig_preemptible") == "1",
               sizes=tuple((int(n), Demand.from_json(d)) for n, d in json.loads(md.get("raybig_sizes", "[]"))))


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
