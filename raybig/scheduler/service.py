"""The scheduling component: one detached, named, restartable Ray actor on the cluster.

Why this shape (and where the durable state lives):
- Every raybig job *is* a Ray job, submitted at once through the Jobs API. Its entrypoint is a light
  "holder" (`raybig.entrypoint`) that reserves 0 CPU in Ray while it waits, asks this actor for
  admission, then runs the spec in the same process. So Ray's job table is the queue: each entry's
  metadata (priority, submit time, gang demand, user) is written once at submission and survives
  the CLI exiting and this actor dying. `ray job list` / `ray job stop` see and stop raybig jobs.
- This actor's own state is soft and rebuilt: after a restart it re-reads the job table and waits
  (up to `recover_s`) until every holder whose Ray job is RUNNING has heartbeated and said whether
  it was already admitted. Only then does it decide again, so nothing runs twice and the order holds.
  No second store is needed.
- Holders heartbeat every `HEARTBEAT_S`; a holder whose Ray job ended (stopped, crashed) is dropped on
  the next tick, which frees its reservation.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import ray
from ray.job_submission import JobStatus

from raybig.metrics import scheduler_observe
from raybig.scheduler.meta import ACTOR_NAME, NAMESPACE, Phase, is_raybig, job_from_metadata
from raybig.scheduler.policy import Decision, Demand, Job, Node, decide

TICK_S = float(os.environ.get("RAYBIG_SCHED_TICK_S", "0.5"))
RECOVER_S = float(os.environ.get("RAYBIG_SCHED_RECOVER_S", "20"))
STALE_S = 15.0


def _quotas() -> dict[str, dict[str, float]]:
    raw = os.environ.get("RAYBIG_QUOTAS", "")
    return json.loads(raw) if raw else {}


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=32)  # type: ignore[call-overload]
class RaybigScheduler:
    """The cluster's one scheduler actor: admits queued jobs by policy (see the module docstring)."""
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regs: dict[str, dict[str, Any]] = {}  # job_id -> {phase, admitted, job, seen}
        self._done: set[str] = set()  # released, but Ray still shows the job RUNNING while it exits
        self._known: dict[str, tuple[dict[str, str], float]] = {}  # alive jobs -> (metadata, last seen)
        self._decision = Decision()
        self._started = time.time()
        self._recovering = True
        self._ticks = 0
        self._last_error = ""
        threading.Thread(target=self._loop, daemon=True).start()

    # --- called by holders ------------------------------------------------------------------
    def heartbeat(self, job_id: str, phase: Phase, job: dict[str, Any]) -> dict[str, Any]:
        """A holder's heartbeat; `phase` (a `Phase`) says whether it waits, runs or backs off."""
        phase = Phase(phase)
        with self._lock:
            r = self._regs.setdefault(job_id, {"admitted": False})
            r.update(phase=phase, seen=time.time(), job=job)
            if phase is Phase.RUNNING:
                r["admitted"] = True  # a holder that says it runs was admitted (maybe before a restart)
            elif phase is Phase.BACKOFF:
                r["admitted"] = False
            return {"admitted": bool(r["admitted"]), "reason": self._decision.reasons.get(job_id, "in queue"),
                    "position": self._decision.positions.get(job_id), "recovering": self._recovering}

    def release(self, job_id: str) -> None:
        """Forget a job that ended; its reservation is free at the next tick."""
        with self._lock:
            self._regs.pop(job_id, None)
            self._done.add(job_id)

    def snapshot(self) -> dict[str, Any]:
        """The actor's state for tests and debugging (registrations, reasons, positions, pid)."""
        with self._lock:
            return {"regs": {k: {"phase": _value(v.get("phase")), "admitted": v.get("admitted")}
                             for k, v in self._regs.items()},
                    "reasons": dict(self._decision.reasons), "positions": dict(self._decision.positions),
                    "ticks": self._ticks, "recovering": self._recovering, "started": self._started,
                    "pid": os.getpid(), "last_error": self._last_error}

    # --- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - a bad tick must not kill the scheduler
                self._last_error = f"{type(e).__name__}: {e}"
            time.sleep(TICK_S)

    def tick(self) -> None:
        """One scheduling round: read the job table, drop ended jobs, decide admissions."""
        table = _job_table()
        with self._lock:
            alive = {jid: md for jid, (status, md) in table.items()
                     if not status.is_terminal() and jid not in self._done}
            self._done &= {jid for jid, (status, _) in table.items() if not status.is_terminal()}
            now = time.time()
            # A job once seen alive stays known until the table shows it ended: one incomplete read
            # of the table must not let a later job jump ahead of it.
            for jid, md in alive.items():
                self._known[jid] = (md, now)
            for jid, (md, seen) in list(self._known.items()):
                if (jid in table and jid not in alive) or jid in self._done:
                    self._known.pop(jid)
                elif jid not in table:
                    if now - seen > STALE_S * 4:
                        self._known.pop(jid)
                    else:
                        print(f"[raybig-scheduler] {jid} missing from the job table; kept", flush=True)
                        alive[jid] = md
            for jid in list(self._regs):
                if jid in table and jid not in alive:  # the Ray job ended: free its reservation
                    print(f"[raybig-scheduler] {jid} ended ({table[jid][0].value})", flush=True)
                    self._regs.pop(jid)
                elif jid not in table and now - self._regs[jid].get("seen", now) > STALE_S:
                    self._regs.pop(jid)  # never showed up in the job table, and went quiet
            if self._recovering:
                running = [j for j, (s, _) in table.items() if s is JobStatus.RUNNING and j in alive]
                missing = [j for j in running if j not in self._regs]
                if missing and time.time() - self._started < RECOVER_S:
                    return
                self._recovering = False
            jobs = []
            for jid, md in alive.items():
                job = job_from_metadata(jid, md)
                r = self._regs.get(jid)
                if r and r.get("phase") is Phase.BACKOFF:
                    continue  # a failed attempt backing off asks for nothing and blocks nobody
                if r:
                    job.ready = r.get("phase") is Phase.WAITING
                    job.admitted = bool(r.get("admitted"))
                jobs.append(job)
            for jid, r in self._regs.items():  # registered but not yet visible in the table
                if jid not in alive and jid not in table and r.get("job"):
                    jobs.append(_job_from_reg(jid, r))
            dec = decide(jobs, _nodes(), _quotas())
            newly = [jid for jid in dec.admit if jid in self._regs and not self._regs[jid].get("admitted")]
            for jid in dec.admit:
                if jid in self._regs:
                    self._regs[jid]["admitted"] = True
            if dec.admit:  # an audit trail in the actor's log: what it saw when it admitted
                saw = [(j.job_id, j.priority, "ready" if j.ready else "-", "adm" if j.admitted else "-")
                       for j in jobs]
                print(f"[raybig-scheduler] admit {dec.admit}; saw {saw}", flush=True)
            self._decision = dec
            self._ticks += 1
            scheduler_observe(jobs, newly)  # Prometheus: queue depth by priority, admissions, waits


def _job_from_reg(jid: str, r: dict[str, Any]) -> Job:
    j = r["job"]
    return Job(jid, int(j["priority"]), float(j["submitted_at"]), Demand.from_json(j["demand"]),
               j.get("user", ""), ready=r.get("phase") is Phase.WAITING, admitted=bool(r.get("admitted")))


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def _job_table() -> dict[str, tuple[JobStatus, dict[str, str]]]:
    """submission_id -> (Ray's JobStatus, metadata) for raybig jobs, from Ray's job table (State API)."""
    from ray.util.state import list_jobs

    out = {}
    # An explicit address: other Ray instances on the same machine must not confuse the lookup.
    gcs = ray.get_runtime_context().gcs_address
    # detail=True: without it the State API leaves out `metadata`, where the queue record lives.
    for j in list_jobs(address=gcs, limit=10_000, detail=True, raise_on_missing_output=False):
        sid = getattr(j, "submission_id", None)
        md = getattr(j, "metadata", None) or {}
        if sid and is_raybig(md):
            out[sid] = (JobStatus(_value(getattr(j, "status", "PENDING"))), md)
    return out


def _nodes() -> list[Node]:
    # Per-node views are only exposed under ray._private.state in 2.60 (aggregate ones are public).
    from ray._private import state

    total = state.total_resources_per_node()
    avail = state.available_resources_per_node()
    return [Node({k: float(v) for k, v in t.items()}, {k: float(v) for k, v in avail.get(nid, {}).items()})
            for nid, t in total.items()]


def get_scheduler() -> Any:
    """The cluster's scheduler actor, created on first use (and re-created after it was removed)."""
    # Pinned to the head node: with num_cpus=0 Ray may otherwise place it on a worker host, whose
    # loss would then also take the queue's decisions down until the actor restarts elsewhere.
    actor: Any = RaybigScheduler  # an ActorClass: @ray.remote adds .options
    return actor.options(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached",
                         get_if_exists=True, resources={"node:__internal_head__": 0.001}).remote()
