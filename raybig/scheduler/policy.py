"""The scheduling policy: pure functions over plain data (no Ray), so it is unit-tested and benchmarked.

Order: priority (higher first), then submission time, then id.

Gang admission: a job is admitted only if *all* its bundles (one per worker, plus the driver) can be
packed onto the nodes at once. A node's capacity is `min(available, total - bundles of admitted jobs)`:
`available` sees what is really in use (including non-raybig work), `total - admitted` sees jobs that
were admitted but whose workers have not been placed yet. Taking the smaller of the two never
over-admits, so two half-placed gangs cannot deadlock each other.

Backfill (EASY-style, no runtime estimates needed): the first job that cannot start becomes the *head*
and holds a reservation. A later job may start only if it fits now **and** the head still fits in the
cluster's total capacity after every admitted job, the backfilled job included. So the head's wait is
bounded by jobs that were running anyway: a backfilled job only ever uses capacity the head could not
use. Quota-blocked jobs never become the head (they must not hold the queue hostage).

Quotas: optional caps per user on the sum of admitted demand (e.g. {"alice": {"CPU": 4}}).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

Res = dict[str, float]
EPS = 1e-9


class JobState(str, Enum):
    """The one lifecycle of a raybig job (as shown by status/list/queue)."""

    PENDING = "PENDING"        # accepted by Ray, its holder process is starting
    QUEUED = "QUEUED"          # waiting for admission
    RUNNING = "RUNNING"        # admitted and running
    RETRYING = "RETRYING"      # failed; backing off before going back into the queue
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED)


@dataclass(frozen=True)
class Demand:
    """A gang: worker bundles that must all fit at once, plus the driver's share."""

    bundles: tuple[tuple[tuple[str, float], ...], ...]

    @staticmethod
    def of(workers: int, per_worker: Res, driver: Res | None = None) -> Demand:
        b = [tuple(sorted(per_worker.items()))] * workers
        if driver and any(v > 0 for v in driver.values()):
            b.append(tuple(sorted(driver.items())))
        return Demand(tuple(b))

    def as_dicts(self) -> list[Res]:
        return [dict(b) for b in self.bundles]

    def total(self) -> Res:
        out: Res = {}
        for b in self.bundles:
            for k, v in b:
                out[k] = out.get(k, 0.0) + v
        return out

    def to_json(self) -> list[Res]:
        return self.as_dicts()

    @staticmethod
    def from_json(data: list[Res]) -> Demand:
        return Demand(tuple(tuple(sorted((str(k), float(v)) for k, v in b.items())) for b in data))


@dataclass
class Job:
    job_id: str
    priority: int
    submitted_at: float
    demand: Demand
    user: str = ""
    ready: bool = True      # the holder has registered and can start now
    admitted: bool = False


@dataclass
class Node:
    total: Res
    available: Res


@dataclass
class Decision:
    admit: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)


def order_key(j: Job) -> tuple[int, float, str]:
    return (-j.priority, j.submitted_at, j.job_id)


def _fits(b: Res, cap: Res) -> bool:
    return all(cap.get(k, 0.0) + EPS >= v for k, v in b.items() if v > 0)


def _take(b: Res, cap: Res) -> None:
    for k, v in b.items():
        cap[k] = cap.get(k, 0.0) - v


def pack(bundles: Iterable[Res], caps: list[Res]) -> bool:
    """First-fit decreasing onto `caps` (mutated on success only)."""
    trial = [dict(c) for c in caps]
    for b in sorted(bundles, key=lambda b: -sum(b.values())):
        for c in trial:
            if _fits(b, c):
                _take(b, c)
                break
        else:
            return False
    caps[:] = trial
    return True


def _shortfall(d: Demand, caps: list[Res]) -> str:
    need, free = d.total(), {}
    for c in caps:
        for k, v in c.items():
            free[k] = free.get(k, 0.0) + max(v, 0.0)
    short = [f"{_num(need[k])} {k}" for k in sorted(need) if need[k] > free.get(k, 0.0) + EPS]
    if short:
        return "waiting for " + " + ".join(short)
    b = max(d.as_dicts(), key=lambda x: sum(x.values()))
    return "waiting for a node with " + " + ".join(f"{_num(v)} {k}" for k, v in sorted(b.items()) if v) + " free"


def _num(v: float) -> str:
    if v >= 2**20 and v == int(v):
        return f"{v / 2**30:.1f}GiB" if v >= 2**30 else f"{v / 2**20:.0f}MiB"
    return f"{v:g}"


def _over_quota(j: Job, used: dict[str, Res], quotas: dict[str, Res]) -> str | None:
    cap = quotas.get(j.user)
    if not cap:
        return None
    mine, need = used.get(j.user, {}), j.demand.total()
    for k, limit in cap.items():
        if mine.get(k, 0.0) + need.get(k, 0.0) > limit + EPS:
            return f"over quota for {j.user}: {k} {_num(mine.get(k, 0.0))} in use + {_num(need.get(k, 0.0))} > {_num(limit)}"
    return None


def decide(jobs: list[Job], nodes: list[Node], quotas: dict[str, Res] | None = None) -> Decision:
    """Which waiting jobs start now, and why each of the others waits."""
    quotas = quotas or {}
    # Capacity net of admitted gangs (placed or not), simulated on node totals.
    reserved = [dict(n.total) for n in nodes]
    used: dict[str, Res] = {}
    for j in jobs:
        if j.admitted:
            pack(j.demand.as_dicts(), reserved) or _spill(j.demand, reserved)
            u = used.setdefault(j.user, {})
            for k, v in j.demand.total().items():
                u[k] = u.get(k, 0.0) + v
    free = [{k: min(n.available.get(k, 0.0), r.get(k, 0.0)) for k in set(n.total) | set(r)}
            for n, r in zip(nodes, reserved, strict=True)]
    totals = [dict(n.total) for n in nodes]
    never: dict[Demand, bool] = {}  # memo: many queued jobs share a gang shape
    dec = Decision()
    head: Job | None = None
    ahead = 0
    for j in sorted((j for j in jobs if not j.admitted), key=order_key):
        dec.positions[j.job_id] = ahead + 1
        q = _over_quota(j, used, quotas)
        if q:
            dec.reasons[j.job_id] = q
            ahead += 1
            continue
        if j.demand not in never:
            never[j.demand] = not pack(j.demand.as_dicts(), [dict(t) for t in totals])
        if never[j.demand]:
            # Impossible on today's nodes (an autoscaler may add some): it must not block the queue.
            dec.reasons[j.job_id] = _why(j, free, True, ahead)
            ahead += 1
            continue
        if head is None:
            if j.ready and pack(j.demand.as_dicts(), free):
                _admit(j, dec, reserved, used)
                continue
            head = j
            dec.reasons[j.job_id] = _why(j, free, False, ahead)
        elif j.ready and _fits_sum(j.demand, free) and _backfill_ok(j, head, reserved) \
                and pack(j.demand.as_dicts(), free):
            _admit(j, dec, reserved, used)
            continue
        elif j.ready and pack(j.demand.as_dicts(), [dict(f) for f in free]):
            # It fits, but starting it could delay the job at the head of the queue.
            dec.reasons[j.job_id] = f"waiting for its turn behind {head.job_id}; {ahead} job" \
                                    f"{'s' if ahead != 1 else ''} ahead"
        else:
            dec.reasons[j.job_id] = _why(j, free, False, ahead)
        ahead += 1
    return dec


def _fits_sum(d: Demand, caps: list[Res]) -> bool:
    """Cheap necessary condition for `pack`: the cluster-wide sums suffice."""
    for k, v in d.total().items():
        if v > 0 and sum(c.get(k, 0.0) for c in caps) + EPS < v:
            return False
    return True


def _why(j: Job, free: list[Res], never: bool, ahead: int) -> str:
    if never:
        r = f"can never fit the current nodes ({_shortfall(j.demand, [dict()])[12:]}); waiting for bigger nodes"
    elif not j.ready:
        r = "starting its driver"
    else:
        r = _shortfall(j.demand, free)
    return f"{r}; {ahead} job{'s' if ahead != 1 else ''} ahead"


def _admit(j: Job, dec: Decision, reserved: list[Res], used: dict[str, Res]) -> None:
    dec.admit.append(j.job_id)
    dec.positions.pop(j.job_id, None)
    j.admitted = True
    pack(j.demand.as_dicts(), reserved) or _spill(j.demand, reserved)
    u = used.setdefault(j.user, {})
    for k, v in j.demand.total().items():
        u[k] = u.get(k, 0.0) + v


def _backfill_ok(j: Job, head: Job, reserved: list[Res]) -> bool:
    """The head must still fit once everything admitted so far (plus j) is done being admitted."""
    after = [dict(r) for r in reserved]
    if not pack(j.demand.as_dicts(), after):
        return False
    return pack(head.demand.as_dicts(), after)


def _spill(d: Demand, caps: list[Res]) -> bool:
    """An admitted gang that no longer packs (a node left): charge it to the first node anyway."""
    if caps:
        _take(d.total(), caps[0])
    return True
