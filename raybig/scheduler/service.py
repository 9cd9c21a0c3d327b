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
- The queue board: what `raybig list/queue` show for every job (state, position, reason, attempt,
  progress, and the one-line cause of a job that ended) is what this actor already knows: holders
  send their attempt, latest metrics and error with their heartbeats and their outcome with
  `release`. After each tick the actor writes it, when it changed, as one JSON file in its node's
  Ray log folder (`BOARD_FILE`), which the CLI reads through the dashboard's log API in one request:
  listing 10,000 jobs costs one job-table listing and one file, never a log read per job.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import ray
from ray.job_submission import JobStatus

from raybig.metrics import scheduler_observe, scheduler_preempted
from raybig.scheduler.meta import ACTOR_NAME, BOARD_FILE, NAMESPACE, Phase, is_raybig, job_from_metadata
from raybig.scheduler.policy import Decision, Demand, Job, JobState, Node, Preemption, decide

TICK_S = float(os.environ.get("RAYBIG_SCHED_TICK_S", "0.5"))
RECOVER_S = float(os.environ.get("RAYBIG_SCHED_RECOVER_S", "20"))
STALE_S = 15.0
BOARD_MIN_S = float(os.environ.get("RAYBIG_BOARD_MIN_S", "1.0"))  # at most one board write per interval
ENDED_KEEP = 10_000  # ended jobs whose outcome the board keeps (oldest forgotten first)
ALIVE_LIMIT = int(os.environ.get("RAY_MAX_LIMIT_FROM_API_SERVER", "10000"))  # the State API's row cap


QUOTA_KEY = "raybig-quotas"  # GCS internal KV (namespace NAMESPACE): quotas set by `raybig queue quota`


def _quotas() -> dict[str, dict[str, float]]:
    raw = os.environ.get("RAYBIG_QUOTAS", "")
    return json.loads(raw) if raw else {}


def stored_quotas() -> dict[str, dict[str, float] | None]:
    """Quotas set with `raybig queue quota` (user -> caps; None: the user's quota was cleared)."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(QUOTA_KEY, namespace=NAMESPACE)
    data = json.loads(raw) if raw else {}
    return data if isinstance(data, dict) else {}


def cluster_quotas() -> dict[str, dict[str, float]]:
    """The quotas in force: RAYBIG_QUOTAS of the head's environment, overridden per user by the stored ones."""
    q = dict(_quotas())
    for user, caps in stored_quotas().items():
        if caps is None:
            q.pop(user, None)
        else:
            q[user] = caps
    return q


PREEMPT_KEY = "raybig-preemption"  # GCS internal KV (namespace NAMESPACE): set by `raybig queue preemption`


def env_preemption() -> dict[str, Any]:
    """Preemption settings from the head's environment (defaults: on, gap 1, 120 s to checkpoint).

    `RAYBIG_PREEMPTION=off` turns it off; `RAYBIG_PREEMPT_MIN_GAP` is the least priority difference
    between a waiting job and a victim; `RAYBIG_PREEMPT_GRACE_S` is how long a victim may take to
    checkpoint and stop before its holder stops the run itself.
    """
    return {"enabled": os.environ.get("RAYBIG_PREEMPTION", "on") != "off",
            "min_gap": int(os.environ.get("RAYBIG_PREEMPT_MIN_GAP", "1")),
            "grace_s": float(os.environ.get("RAYBIG_PREEMPT_GRACE_S", "120"))}


def stored_preemption() -> dict[str, Any]:
    """Preemption settings set with `raybig queue preemption` (only the keys that were set)."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(PREEMPT_KEY, namespace=NAMESPACE)
    data = json.loads(raw) if raw else {}
    return data if isinstance(data, dict) else {}


def cluster_preemption() -> dict[str, Any]:
    """The preemption settings in force: the environment's, overridden key by key by the stored ones."""
    return {**env_preemption(), **stored_preemption()}


# A victim's holder stops its own run `grace_s` after the request; past this much more, the scheduler
# stops the Ray job itself (a holder that no longer answers).
HARD_STOP_S = float(os.environ.get("RAYBIG_PREEMPT_HARD_STOP_S", "60"))

JobTable = dict[str, tuple[JobStatus, dict[str, str]]]


class SchedulerCore:
    """The scheduler's state and its tick, without Ray (the actor below wraps it; tests drive it).

    Per tick, work beyond the policy's own pass is proportional to what changed: a job's metadata is
    parsed once (cached by job id and metadata hash), only jobs that vanished from the alive listing
    have their status looked up, and the audit line names only jobs whose state changed.

    Args:
        list_alive: job id -> (status, metadata) of every raybig job Ray has not ended.
        lookup: job id -> (status, metadata) for the given ids (ended ones included); ids Ray does
            not know are left out.
        nodes: the cluster's nodes now.
        quotas: per-user resource quotas.
        log: where audit lines go (default: print to the actor's log).
        preemption: the preemption settings (`env_preemption`'s keys), read every tick.
        stop_job: stops a Ray job by id (the last resort for a victim whose holder stopped answering).
    """

    def __init__(self, list_alive: Callable[[], JobTable], lookup: Callable[[Iterable[str]], JobTable],
                 nodes: Callable[[], list[Node]], quotas: Callable[[], dict[str, dict[str, float]]] = _quotas,
                 log: Callable[[str], None] | None = None,
                 preemption: Callable[[], dict[str, Any]] = env_preemption,
                 stop_job: Callable[[str], None] | None = None) -> None:
        self._list_alive, self._lookup, self._nodes, self._quotas_fn = list_alive, lookup, nodes, quotas
        self._preemption_fn, self._stop_job = preemption, stop_job
        self._preemption_now: dict[str, Any] = {}
        self.preemptions = 0  # victims asked to yield since start (tests, the board)
        self._log = log or (lambda line: print(line, flush=True))
        self._lock = threading.Lock()
        self._regs: dict[str, dict[str, Any]] = {}  # job_id -> {phase, admitted, job, seen}
        self._done: set[str] = set()  # released, but Ray still shows the job RUNNING while it exits
        self._known: dict[str, tuple[dict[str, str], float]] = {}  # alive jobs -> (metadata, last seen)
        self._parsed: dict[str, tuple[int, Job]] = {}  # job id -> (metadata hash, Job from it)
        self._audited: dict[str, tuple[int, bool, bool]] = {}  # job id -> what the last audit line saw
        self._ended: dict[str, dict[str, Any]] = {}  # job id -> {state, error} from `release` (insertion order)
        self._decision = Decision()
        self._quotas_now: dict[str, dict[str, float]] = {}
        self._started = time.time()
        self._recovering = True
        self._ticks = 0
        self._last_error = ""
        self.parses = 0  # metadata parses so far (tests check they follow changes, not the table size)

    # --- called by holders ------------------------------------------------------------------
    def heartbeat(self, job_id: str, phase: Phase, job: dict[str, Any],
                  info: dict[str, Any] | None = None) -> dict[str, Any]:
        """A holder's heartbeat; `phase` (a `Phase`) says whether it waits, runs or backs off.

        Args:
            job_id: the Ray submission id.
            phase: the holder's `Phase`.
            job: its queue record (priority, submitted_at, demand, user).
            info: what the board shows for it besides the scheduler's own view: `attempt`, `of`,
                `error` (a failed attempt's one-line cause) and `metrics` (latest progress).
        """
        phase = Phase(phase)
        with self._lock:
            r = self._regs.setdefault(job_id, {"admitted": False})
            r.update(phase=phase, seen=time.time(), job=job)
            if info is not None:
                r["info"] = info
            back = int((info or {}).get("preempted") or 0)  # how often this job has yielded so far
            if phase is Phase.WAITING and back > r.get("preempted", 0):
                # A victim back in the queue after checkpointing: it asks for admission again.
                r["preempted"] = back
                if r.get("admitted"):
                    self._log(f"[raybig-scheduler] {job_id} preempted: stopped at step "
                              f"{(info or {}).get('preempted_at_step', '?')}, back in the queue")
                r["admitted"] = False
                r.pop("preempt", None)
                r.pop("workers", None)
            if phase is Phase.RUNNING:
                r["admitted"] = True  # a holder that says it runs was admitted (maybe before a restart)
                yielding = (info or {}).get("yielding")
                if yielding and "preempt" not in r:
                    r["preempt"] = dict(yielding)  # asked before a scheduler restart: still leaving
            elif phase is Phase.BACKOFF:
                r["admitted"] = False
                r.pop("preempt", None)
            out = {"admitted": bool(r["admitted"]), "reason": self._decision.reasons.get(job_id, "in queue"),
                   "position": self._decision.positions.get(job_id), "recovering": self._recovering}
            if r["admitted"] and r.get("workers"):
                out["workers"] = r["workers"]  # a worker range admitted below its maximum
            if r["admitted"] and r.get("preempt"):
                out["preempt"] = r["preempt"]  # checkpoint now and stop: a higher-priority job needs room
            return out

    def release(self, job_id: str, outcome: dict[str, Any] | None = None) -> None:
        """Forget a job that ended; its reservation is free at the next tick.

        Args:
            job_id: the Ray submission id.
            outcome: `{"state": JobState value, "error": one-line cause, ...}`, kept for the board (the
                cause `raybig list --all` shows) for the last `ENDED_KEEP` ended jobs.
        """
        with self._lock:
            self._regs.pop(job_id, None)
            self._done.add(job_id)
            if outcome is not None:
                self._ended.pop(job_id, None)
                self._ended[job_id] = {k: v for k, v in outcome.items() if k in ("state", "error", "attempts")}
                while len(self._ended) > ENDED_KEEP:
                    self._ended.pop(next(iter(self._ended)))

    def board(self) -> dict[str, Any]:
        """What `raybig list/queue` show per job, from this actor's state alone; O(jobs).

        Returns:
            `{"t": time, "recovering": bool, "jobs": {job id: {"state", "position", "reason", "attempt",
            "of", "error", "metrics"}}}`, `state` a `JobState` value: QUEUED (waiting, with the
            policy's reason and position), RUNNING (admitted), RETRYING (a failed attempt backing
            off), or the outcome its holder reported when it ended. Keys without a value are left out.
        """
        with self._lock:
            reasons, positions = self._decision.reasons, self._decision.positions
            jobs: dict[str, dict[str, Any]] = {jid: dict(o) for jid, o in self._ended.items()}
            for jid, r in self._regs.items():
                info = r.get("info") or {}
                phase = r.get("phase")
                e: dict[str, Any] = {}
                if phase is Phase.BACKOFF:
                    e["state"] = JobState.RETRYING.value
                elif r.get("admitted") or phase is Phase.RUNNING:
                    e["state"] = JobState.RUNNING.value
                    if r.get("preempt"):
                        e["reason"] = f"preempted for {r['preempt'].get('by')}: checkpointing"
                    if r.get("workers"):
                        e["workers"] = r["workers"]
                else:
                    e["state"] = (JobState.PREEMPTED if r.get("preempted") else JobState.QUEUED).value
                    e["reason"] = reasons.get(jid, "in queue")
                    if jid in positions:
                        e["position"] = positions[jid]
                if r.get("preempted"):
                    e["preempted"] = r["preempted"]
                for k in ("attempt", "of", "error", "metrics"):
                    if info.get(k):
                        e[k] = info[k]
                jobs[jid] = e
            usage: dict[str, dict[str, float]] = {}
            for r in self._regs.values():
                j = r.get("job") or {}
                if r.get("admitted") and r.get("phase") is not Phase.BACKOFF and j.get("demand") is not None:
                    u = usage.setdefault(str(j.get("user", "")), {})
                    n = r.get("workers")  # a worker range admitted below its maximum
                    d = next((d for m, d in j.get("sizes") or () if m == n), j["demand"]) if n else j["demand"]
                    for k, v in Demand.from_json(d).total().items():
                        u[k] = u.get(k, 0.0) + v
            return {"t": round(time.time(), 3), "recovering": self._recovering, "quotas": self._quotas_now,
                    "usage": usage, "preemption": self._preemption_now, "preemptions": self.preemptions,
                    "jobs": jobs}

    def snapshot(self) -> dict[str, Any]:
        """The actor's state for tests and debugging (registrations, reasons, positions, pid)."""
        with self._lock:
            # Preemption and worker-range fields only where set (most jobs: phase and admitted alone).
            return {"regs": {k: {"phase": _value(v.get("phase")), "admitted": v.get("admitted"),
                                 **{f: v[f] for f in ("preempt", "preempted", "workers") if v.get(f)}}
                             for k, v in self._regs.items()},
                    "preemptions": self.preemptions,
                    "reasons": dict(self._decision.reasons), "positions": dict(self._decision.positions),
                    "ticks": self._ticks, "recovering": self._recovering, "started": self._started,
                    "pid": os.getpid(), "last_error": self._last_error}

    # --- the tick -----------------------------------------------------------------------------
    def _table(self) -> JobTable:
        """Alive jobs, plus the status of jobs this actor tracks that are no longer listed alive."""
        table = dict(self._list_alive())
        missing = [j for j in {*self._regs, *self._known, *self._done} if j not in table]
        if missing:
            table.update(self._lookup(missing))
        return table

    def _job(self, jid: str, md: dict[str, str]) -> Job:
        """The policy's `Job` for a table entry: parsed once per (job id, metadata), then copied."""
        # The fields job_from_metadata reads (Ray never changes a job's metadata; a new job is a new id).
        h = hash((md.get("raybig_priority"), md.get("raybig_submitted_at"), md.get("raybig_demand"),
                  md.get("raybig_user"), md.get("raybig_preemptible"), md.get("raybig_sizes")))
        hit = self._parsed.get(jid)
        if hit is None or hit[0] != h:
            self.parses += 1
            hit = self._parsed[jid] = (h, job_from_metadata(jid, md))
        j = hit[1]  # a fresh copy: ready/admitted are set on it per tick
        return Job(j.job_id, j.priority, j.submitted_at, j.demand, j.user, ready=False,
                   preemptible=j.preemptible, sizes=j.sizes)

    def tick(self) -> None:
        """One scheduling round: read the job table, drop ended jobs, decide admissions."""
        table = self._table()
        with self._lock:
            alive = {jid: md for jid, (status, md) in table.items()
                     if not status.is_terminal() and jid not in self._done}
            self._done = {jid for jid in self._done if jid in table and not table[jid][0].is_terminal()}
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
                        self._log(f"[raybig-scheduler] {jid} missing from the job table; kept")
                        alive[jid] = md
            for jid in list(self._parsed):
                if jid not in alive:
                    self._parsed.pop(jid)
            for jid in list(self._regs):
                if jid in table and jid not in alive:  # the Ray job ended: free its reservation
                    self._log(f"[raybig-scheduler] {jid} ended ({table[jid][0].value})")
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
                job = self._job(jid, md)
                r = self._regs.get(jid)
                if r and r.get("phase") is Phase.BACKOFF:
                    continue  # a failed attempt backing off asks for nothing and blocks nobody
                if r:
                    job.ready = r.get("phase") is Phase.WAITING
                    job.admitted = bool(r.get("admitted"))
                    _admitted_shape(job, r)
                jobs.append(job)
            for jid, r in self._regs.items():  # registered but not yet visible in the table
                if jid not in alive and jid not in table and r.get("job"):
                    jobs.append(_job_from_reg(jid, r))
            self._quotas_now = self._quotas_fn()
            pre = self._preemption_now = self._preemption_fn()
            policy = Preemption(min_gap=max(1, int(pre.get("min_gap", 1)))) if pre.get("enabled", True) else None
            dec = decide(jobs, self._nodes(), self._quotas_now, policy)
            newly = [jid for jid in dec.admit if jid in self._regs and not self._regs[jid].get("admitted")]
            for jid in dec.admit:
                if jid in self._regs:
                    self._regs[jid]["admitted"] = True
                    if jid in dec.workers:
                        self._regs[jid]["workers"] = dec.workers[jid]
            if dec.admit:  # an audit trail in the actor's log: what changed since the last admission
                self._audit(dec.admit, jobs)
            self._preempt(dec, jobs, float(pre.get("grace_s", 120)))
            self._decision = dec
            self._ticks += 1
            scheduler_observe(jobs, newly)  # Prometheus: queue depth by priority, admissions, waits

    def _preempt(self, dec: Decision, jobs: list[Job], grace_s: float) -> None:
        """Ask the decision's victims to yield (their holders learn it from the heartbeat answer).

        Also stops the Ray job of a victim whose holder has not stopped its run long after the bound.
        """
        now = time.time()
        by_id = {j.job_id: j for j in jobs}
        for victim, head in dec.preempt.items():
            r = self._regs.get(victim)
            if r is None or not r.get("admitted") or r.get("preempt"):
                continue
            r["preempt"] = {"by": head, "t": round(now, 3), "grace_s": grace_s}
            self.preemptions += 1
            v, h = by_id.get(victim), by_id.get(head)
            self._log(f"[raybig-scheduler] preempt {victim} (priority {v.priority if v else '?'}) for {head} "
                      f"(priority {h.priority if h else '?'}): checkpoint now, within {grace_s:g} s")
            scheduler_preempted(v.priority if v else 0)
        for jid, r in self._regs.items():
            p = r.get("preempt")
            if (p and r.get("admitted") and not p.get("stopped") and self._stop_job is not None
                    and now - float(p.get("t", now)) > float(p.get("grace_s", grace_s)) + HARD_STOP_S):
                p["stopped"] = True
                self._log(f"[raybig-scheduler] {jid} did not yield within {p.get('grace_s')} s + {HARD_STOP_S:g} s: "
                          "stopping its Ray job")
                try:
                    self._stop_job(jid)
                except Exception as e:  # noqa: BLE001 - logged; the next tick sees whether it ended
                    self._log(f"[raybig-scheduler] stopping {jid} failed: {e}")

    def _audit(self, admit: list[str], jobs: list[Job]) -> None:
        """Log the admissions with the jobs whose (priority, ready, admitted) changed since the last one."""
        seen = {j.job_id: (j.priority, j.ready, j.admitted) for j in jobs}
        changed = [(jid, *v) for jid, v in seen.items() if self._audited.get(jid) != v]
        gone = [jid for jid in self._audited if jid not in seen]
        self._audited = seen
        saw = [(jid, p, "ready" if r else "-", "adm" if a else "-") for jid, p, r, a in changed]
        self._log(f"[raybig-scheduler] admit {admit}; {len(seen)} jobs; changed {saw}"
                  + (f"; gone {gone}" if gone else ""))


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=32)  # type: ignore[call-overload]
class RaybigScheduler(SchedulerCore):
    """The cluster's one scheduler actor: admits queued jobs by policy (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(_job_table, _job_statuses, _nodes, quotas=cluster_quotas, preemption=cluster_preemption,
                         stop_job=_stop_ray_job)
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        last_board, written = b"", 0.0
        while True:
            try:
                self.tick()
                if time.time() - written >= BOARD_MIN_S:
                    last_board = write_board(self.board(), last_board)
                    written = time.time()
            except Exception as e:  # noqa: BLE001 - a bad tick must not kill the scheduler
                self._last_error = f"{type(e).__name__}: {e}"
            time.sleep(TICK_S)


def board_path() -> str:
    """Where this process's node keeps the board: `BOARD_FILE` in the node's Ray log folder."""
    node: Any = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        node = getattr(ray._private.worker.global_worker, "node", None)
    if node is None:
        raise RuntimeError("no Ray node in this process: nowhere to write the queue board")
    return os.path.join(node.get_logs_dir_path(), BOARD_FILE)


def write_board(board: dict[str, Any], previous: bytes = b"", path: str | None = None) -> bytes:
    """Write the board (atomically, only when more than its time changed); returns what was compared."""
    rest = {k: v for k, v in board.items() if k != "t"}
    body = json.dumps(rest, separators=(",", ":"), sort_keys=True, default=str).encode()
    if body == previous:
        return previous
    path = path or board_path()
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(b'{"t":' + json.dumps(board.get("t")).encode() + b"," + body[1:] + b"\n")
    os.replace(tmp, path)
    return body


def _job_from_reg(jid: str, r: dict[str, Any]) -> Job:
    j = r["job"]
    return Job(jid, int(j["priority"]), float(j["submitted_at"]), Demand.from_json(j["demand"]),
               j.get("user", ""), ready=r.get("phase") is Phase.WAITING, admitted=bool(r.get("admitted")),
               preemptible=bool(j.get("preemptible")), preempting=bool(r.get("admitted") and r.get("preempt")),
               sizes=tuple((int(n), Demand.from_json(d)) for n, d in j.get("sizes") or ()))


def _admitted_shape(job: Job, r: dict[str, Any]) -> None:
    """An admitted job's gang as admitted: a worker range at its admitted size; marks a leaving victim."""
    job.preempting = job.admitted and bool(r.get("preempt"))
    n = r.get("workers") or (r.get("job") or {}).get("workers")
    if job.admitted and n:
        job.demand = next((d for m, d in job.sizes if m == n), job.demand)


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def _job_table() -> JobTable:
    """submission_id -> (Ray's JobStatus, metadata) for raybig jobs Ray has not ended (State API).

    Listed per alive status, server-side filtered, so ended jobs (which pile up in Ray's table)
    never count against the State API's 10,000-row cap: up to 10,000 pending plus 10,000 running.
    """
    from ray.util.state import list_jobs

    out = {}
    # An explicit address: other Ray instances on the same machine must not confuse the lookup.
    gcs = ray.get_runtime_context().gcs_address
    for status in (JobStatus.PENDING, JobStatus.RUNNING):
        # detail=True: without it the State API leaves out `metadata`, where the queue record lives.
        rows = list_jobs(address=gcs, limit=ALIVE_LIMIT, detail=True, raise_on_missing_output=False,
                         filters=[("type", "=", "SUBMISSION"), ("status", "=", status.value)])
        if len(rows) >= ALIVE_LIMIT:
            print(f"[raybig-scheduler] {len(rows)}+ {status.value} jobs: the State API caps a listing at "
                  f"{ALIVE_LIMIT}; raise RAY_MAX_LIMIT_FROM_API_SERVER on the head", flush=True)
        for j in rows:
            sid = getattr(j, "submission_id", None)
            md = getattr(j, "metadata", None) or {}
            if sid and is_raybig(md):
                out[sid] = (JobStatus(_value(getattr(j, "status", "PENDING"))), md)
    return out


def _job_statuses(job_ids: Iterable[str]) -> JobTable:
    """(status, metadata) of the given submission ids, ended ones included (GCS KV, one read each)."""
    from ray.dashboard.modules.job.common import JobInfo, JobInfoStorageClient
    from ray.experimental.internal_kv import _internal_kv_get

    out: JobTable = {}
    for jid in job_ids:
        raw = _internal_kv_get(JobInfoStorageClient.JOB_DATA_KEY.format(job_id=jid), namespace="job")
        if raw is None:
            continue
        info: Any = JobInfo.from_json(json.loads(raw))
        out[jid] = (JobStatus(_value(info.status)), info.metadata or {})
    return out


def _stop_ray_job(job_id: str) -> None:
    """`ray job stop JOB`, from inside the cluster: ask the job's supervisor actor to stop its driver."""
    from ray.dashboard.modules.job.common import JOB_ACTOR_NAME_TEMPLATE, SUPERVISOR_ACTOR_RAY_NAMESPACE

    actor = ray.get_actor(JOB_ACTOR_NAME_TEMPLATE.format(job_id=job_id), namespace=SUPERVISOR_ACTOR_RAY_NAMESPACE)
    actor.stop.remote()


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
