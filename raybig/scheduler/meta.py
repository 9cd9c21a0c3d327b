"""What a raybig job carries in Ray's job table: its metadata (the durable queue record).

Ray's job metadata is a flat str->str map, written once at submission. It holds everything the
scheduler needs to rebuild the queue after a restart: priority, submission time, the gang demand,
the owner and the spec hash. The frozen spec itself travels in the job's runtime_env env vars.
"""

from __future__ import annotations

import json
import os
from typing import Any

from raybig.scheduler.policy import Demand, Job

MARK = "raybig"
NAMESPACE = "raybig"
ACTOR_NAME = "raybig-scheduler"
STATE_PREFIX = "[raybig] state "      # holder log lines the CLI reads for status
METRICS_PREFIX = "[raybig] metrics "


def driver_cpus() -> float:
    """CPU the scheduler books for each job's driver (Ray itself reserves 0 so a queued holder is free)."""
    return float(os.environ.get("RAYBIG_DRIVER_CPUS", "0.5"))


def demand_of(spec: Any) -> Demand:
    """The gang a spec needs: workers x per-worker resources, plus the driver."""
    r = getattr(spec, "resources", None)
    driver = {"CPU": driver_cpus()}
    if r is None or not hasattr(r, "workers"):
        return Demand.of(0, {}, driver)
    per: dict[str, float] = {"CPU": float(r.cpus_per_worker), **{k: float(v) for k, v in r.custom.items()}}
    if getattr(r, "gpus_per_worker", 0):
        per["GPU"] = float(r.gpus_per_worker)
    if getattr(r, "memory_per_worker", None):
        per["memory"] = float(r.memory_per_worker)
    return Demand.of(int(r.workers), per, driver)


def metadata_for(spec: Any, spec_hash: str, user: str, submitted_at: float) -> dict[str, str]:
    return {
        MARK: "1",
        "raybig_kind": str(spec.kind),
        "raybig_name": str(spec.name),
        "raybig_priority": str(int(getattr(spec, "priority", 0))),
        "raybig_max_retries": str(int(getattr(spec, "max_retries", 0))),
        "raybig_demand": json.dumps(demand_of(spec).to_json(), separators=(",", ":")),
        "raybig_spec_hash": spec_hash,
        "raybig_user": user,
        "raybig_submitted_at": f"{submitted_at:.6f}",
    }


def is_raybig(metadata: dict[str, str] | None) -> bool:
    return bool(metadata) and metadata.get(MARK) == "1"


def job_from_metadata(job_id: str, md: dict[str, str]) -> Job:
    return Job(job_id=job_id, priority=int(md.get("raybig_priority", "0")),
               submitted_at=float(md.get("raybig_submitted_at", "0")),
               demand=Demand.from_json(json.loads(md.get("raybig_demand", "[]"))),
               user=md.get("raybig_user", ""), ready=False)


def state_line(state: str, **fields: Any) -> str:
    return STATE_PREFIX + json.dumps({"state": state, **fields}, default=str)


def last_state(logs: str) -> dict[str, Any] | None:
    """The holder's latest self-reported state and metrics, parsed from its log text."""
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
    if state is not None and metrics:
        state["metrics"] = metrics
    return state
