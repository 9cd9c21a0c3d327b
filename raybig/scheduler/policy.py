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

Worker ranges: a job whose `resources.workers` is a range carries its smaller gangs (`Job.sizes`,
largest first). It starts at the largest size that fits now (and passes its quota); it can never fit
only when its smallest gang can never fit, and as the head it reserves its smallest gang.

Preemption (`Preemption`, off unless given): when the head (a ready job, within its quota, that can
fit the cluster) cannot start, and admitted jobs at least `min_gap` priority levels below it that are
preemptible hold what it needs, `pick_victims` chooses the fewest of them, lowest priority first,
whose leaving lets the head's gang pack onto the nodes' totals net of every other admitted gang.
Jobs already asked to yield (`Job.preempting`) count as leaving, and while they suffice no new victim
is picked: one preemption per head, however many ticks the victims take to checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from itertools import combinations
from operator import attrgetter

Res = dict[str, float]
EPS = 1e-9


class JobState(str, Enum):
    """The one lifecycle of a raybig job (as shown by status/list/queue)."""

    PENDING = "PENDING"        # accepted by Ray, its holder process is starting
    QUEUED = "QUEUED"          # waiting for admission
    RUNNING = "RUNNING"        # admitted and running
    RETRYING = "RETRYING"      # failed; backing off before going back into the queue
    PREEMPTED = "PREEMPTED"    # checkpointed and stopped for a higher-priority job; queued to resume
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    @property
    def is_terminal(self) -> bool:
        """True for the states a job never leaves (succeeded, failed, stopped)."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED)


@dataclass(frozen=True)
class Demand:
    """A gang: worker bundles that must all fit at once, plus the driver's share."""

    bundles: tuple[tuple[tuple[str, float], ...], ...]

    @staticmethod
    def of(workers: int, per_worker: Res, driver: Res | None = None) -> Demand:
        """`workers` equal bundles of `per_worker`, plus the driver's bundle if it asks for anything."""
        b = [tuple(sorted(per_worker.items()))] * workers
        if driver and any(v > 0 for v in driver.values()):
            b.append(tuple(sorted(driver.items())))
        return Demand(tuple(b))

    def as_dicts(self) -> list[Res]:
        """The bundles as resource dicts, in order."""
        return [dict(b) for b in self.bundles]

    def total(self) -> Res:
        """The gang's total per resource, summed over its bundles. O(bundles x keys)."""
        out: Res = {}
        for b in self.bundles:
            for k, v in b:
                out[k] = out.get(k, 0.0) + v
        return out

    def to_json(self) -> list[Res]:
        """JSON-ready form (a list of resource dicts), as kept in a job's metadata."""
        return self.as_dicts()

    @staticmethod
    def from_json(data: list[Res]) -> Demand:
        """The inverse of `to_json`."""
        return Demand(tuple(tuple(sorted((str(k), float(v)) for k, v in b.items())) for b in data))


@dataclass
class Job:
    """One raybig job as the policy sees it (`submitted_at` in epoch seconds, higher priority first)."""

    job_id: str
    priority: int
    submitted_at: float
    demand: Demand
    user: str = ""
    ready: bool = True      # the holder has registered and can start now
    admitted: bool = False
    preemptible: bool = False  # may be asked to checkpoint and yield to a higher-priority job
    preempting: bool = False   # admitted, and already asked to yield (its gang is on its way out)
    sizes: tuple[tuple[int, Demand], ...] = ()  # a worker range's smaller gangs: (workers, demand), largest first


@dataclass
class Node:
    """One node's resources: its `total`, and what Ray reports `available` now (same units)."""

    total: Res
    available: Res


@dataclass
class Decision:
    """A pass's outcome: ids to admit (in order), and a reason and 1-based queue position per waiting job."""

    admit: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)  # admitted below their range's maximum: the size
    preempt: dict[str, str] = field(default_factory=dict)  # victim id -> the job it makes room for


@dataclass(frozen=True)
class Preemption:
    """The preemption settings of a pass (`decide(..., preemption=...)`).

    Attributes:
        min_gap: a victim's priority is at most the waiting job's minus this (>= 1).
        max_combinations: victim sets tried exactly per set size before falling back to a greedy
            choice (lowest priority first, then dropping any victim the others make redundant).
    """

    min_gap: int = 1
    max_combinations: int = 4096


def order_key(j: Job) -> tuple[int, float, str]:
    """The queue order: priority (higher first), then submission time, then id."""
    return (-j.priority, j.submitted_at, j.job_id)


_by_id = attrgetter("job_id")
_by_time = attrgetter("submitted_at")
_by_priority = attrgetter("priority")


def _fits(b: Res, cap: Res) -> bool:
    return all(cap.get(k, 0.0) + EPS >= v for k, v in b.items() if v > 0)


def _take(b: Res, cap: Res) -> None:
    for k, v in b.items():
        cap[k] = cap.get(k, 0.0) - v


def pack(bundles: Iterable[Res], caps: list[Res]) -> bool:
    """First-fit decreasing of `bundles` onto `caps` (per-node free resources; mutated on success only).

    Bundles go largest first (by the sum of their values, ties in the given order), each onto the first
    node where every positive amount fits (within `EPS`). O(nodes x keys) for the trial copy plus
    O(bundles x nodes x keys) for the placement: `decide` uses the incremental `_Caps` instead.
    """
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


def _num(v: float) -> str:
    if v >= 2**20 and v == int(v):
        return f"{v / 2**30:.1f}GiB" if v >= 2**30 else f"{v / 2**20:.0f}MiB"
    return f"{v:g}"


class _Shape:
    """One distinct gang demand, prepared once per pass (many queued jobs share a shape)."""

    __slots__ = ("demand", "total", "runs", "shrinks", "never", "never_text", "biggest")

    def __init__(self, d: Demand) -> None:
        self.demand = d
        self.total = d.total()
        dicts = d.as_dicts()
        # The packing order of `pack`: largest bundle first, ties kept in order (a stable sort), as
        # runs of equal bundles: (all items, the positive ones that must fit, how many in a row).
        runs: list[tuple[tuple, tuple, int]] = []
        for b in sorted(dicts, key=lambda b: -sum(b.values())):
            items = tuple(b.items())
            if runs and runs[-1][0] == items:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((items, tuple((k, v) for k, v in items if v > 0), 1))
        self.runs = runs
        # Placing it only ever takes capacity (no negative amounts): what `_Caps.hint` relies on.
        self.shrinks = all(v >= 0 for b in dicts for v in b.values())
        self.never: bool | None = None
        self.never_text = ""
        self.biggest = max(dicts, key=lambda x: sum(x.values())) if dicts else None


class _Caps:
    """Per-node free resources with first-fit-decreasing placement that undoes instead of copying.

    Within one pass capacity only ever shrinks (admissions take, trials are undone), so a node that could
    not hold a bundle once cannot hold it later: `hint` remembers, per bundle, the first node that may
    still fit it, and each search resumes there. Searches cost O(keys) per node skipped, and each node is
    skipped at most once per distinct bundle per pass; commits and undos cost O(keys) per bundle.
    """

    __slots__ = ("caps", "hint", "n")

    def __init__(self, caps: list[Res]) -> None:
        self.caps = caps
        self.n = len(caps)
        self.hint: dict[tuple, int] = {}

    def pack(self, shape: _Shape, undo: list | None = None) -> bool:
        """`pack(shape's bundles, caps)`. With `undo` given, what it took is logged there for `rollback`."""
        caps, hint, n = self.caps, self.hint, self.n
        if not shape.shrinks:  # a negative amount gives capacity back: forget what was learned
            hint.clear()
            hint = {}
        log: list = [] if undo is None else undo
        mark = len(log)
        learned: list[tuple[tuple, int]] = []
        last: dict[tuple, int] = {}
        for items, need, count in shape.runs:
            # Nodes before `hint` failed this bundle at a state with at least today's capacity;
            # nodes before `last` failed it earlier in this same gang.
            i = max(hint.get(items, 0), last.get(items, 0) if shape.shrinks else 0)
            while True:
                while i < n:
                    c = caps[i]
                    for k, v in need:
                        if c.get(k, 0.0) + EPS < v:
                            break
                    else:
                        break
                    i += 1
                if not log:  # searched at the committed state: valid for the rest of the pass
                    if i > hint.get(items, 0):
                        hint[items] = i
                else:
                    learned.append((items, i))
                if i == n:
                    self.rollback(log, mark)
                    return False
                c = caps[i]
                for k, _ in items:
                    log.append((c, k, c.get(k)))
                # As many copies of the bundle as still fit go onto this node, one after the other.
                while True:
                    for k, v in items:
                        c[k] = c.get(k, 0.0) - v
                    count -= 1
                    if not count:
                        break
                    for k, v in need:
                        if c[k] + EPS < v:
                            break
                    else:
                        continue
                    break
                if not count:
                    break
                i += 1  # this node is full for the bundle, and the ones before it were already
            last[items] = i
        if undo is None:  # committed: what the gang's later bundles learned holds from now on
            for items, i in learned:
                if i > hint.get(items, 0):
                    hint[items] = i
        return True

    @staticmethod
    def rollback(log: list, mark: int = 0) -> None:
        """Undo everything logged after `mark`, newest first."""
        for idx in range(len(log) - 1, mark - 1, -1):
            c, k, old = log[idx]
            if old is None:
                del c[k]
            else:
                c[k] = old
        del log[mark:]

    def trial(self, shape: _Shape, then: _Shape | None = None) -> bool:
        """Would `shape` pack (and then `then` pack after it)? Leaves the capacity as it was."""
        log: list = []
        ok = self.pack(shape, log) and (then is None or self.pack(then, log))
        self.rollback(log)
        return ok

    def spill(self, total: Res) -> None:
        """An admitted gang that no longer packs (a node left): charge it to the first node anyway."""
        if self.caps:
            _take(total, self.caps[0])
            if any(v < 0 for v in total.values()):
                self.hint.clear()

    def sum(self, k: str) -> float:
        """Cluster-wide sum of `k`, negatives included, added in node order (the backfill pre-check)."""
        return sum(c.get(k, 0.0) for c in self.caps)

    def free_sums(self) -> Res:
        """Cluster-wide free amount per resource, negatives counted as 0, added in node order (reasons)."""
        free: Res = {}
        for c in self.caps:
            for k, v in c.items():
                free[k] = free.get(k, 0.0) + max(v, 0.0)
        return free


def _shortfall_text(shape: _Shape, free: Res) -> str:
    need = shape.total
    short = [f"{_num(need[k])} {k}" for k in sorted(need) if need[k] > free.get(k, 0.0) + EPS]
    if short:
        return "waiting for " + " + ".join(short)
    b = shape.biggest or {}  # None only for an empty gang, which always fits
    return "waiting for a node with " + " + ".join(f"{_num(v)} {k}" for k, v in sorted(b.items()) if v) + " free"


def missing_text(bundles: list[Res], totals: list[Res]) -> str:
    """What keeps a gang from ever fitting nodes of these `totals` (None of it is about what is busy).

    In order: a bundle larger than every node in some resource ("a bundle needs 1 GPU; no node has
    any GPU"), then a resource the whole cluster has too little of ("6 CPU in all; the nodes have 4
    CPU"), else the bundles cannot be packed onto the nodes together.
    """
    for b in sorted(bundles, key=lambda b: -sum(b.values())):
        for k, v in sorted(b.items()):
            if v <= 0:
                continue
            most = max((t.get(k, 0.0) for t in totals), default=0.0)
            if most + EPS < v:
                has = f"no node has any {k}" if most <= 0 else f"the most one node has is {_num(most)} {k}"
                return f"a bundle needs {_num(v)} {k}; {has}"
    need: Res = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    for k in sorted(need):
        have = sum(t.get(k, 0.0) for t in totals)
        if need[k] > have + EPS:
            return f"{_num(need[k])} {k} in all; the {len(totals)} node(s) have {_num(have)} {k}"
    return f"its {len(bundles)} bundles do not pack onto the {len(totals)} node(s) at once"


def never_fit_reason(bundles: list[Res], totals: list[Res]) -> str:
    """The queue's reason for a gang that can never fit the current nodes (it names what is missing)."""
    return f"can never fit the current nodes: {missing_text(bundles, totals)}; waiting for bigger nodes"


def _over_quota(user: str, need: Res, used: dict[str, Res], quotas: dict[str, Res]) -> str | None:
    cap = quotas.get(user)
    if not cap:
        return None
    mine = used.get(user, {})
    for k, limit in cap.items():
        if mine.get(k, 0.0) + need.get(k, 0.0) > limit + EPS:
            return f"over quota for {user}: {k} {_num(mine.get(k, 0.0))} in use + {_num(need.get(k, 0.0))} > {_num(limit)}"
    return None


def _use(used: dict[str, Res], user: str, total: Res) -> None:
    u = used.setdefault(user, {})
    for k, v in total.items():
        u[k] = u.get(k, 0.0) + v


def decide(jobs: list[Job], nodes: list[Node], quotas: dict[str, Res] | None = None,
           preemption: Preemption | None = None) -> Decision:
    """Which waiting jobs start now, and why each of the others waits (one full scheduling pass).

    `jobs`: every live job, admitted or waiting (the ones this pass admits get `admitted=True`).
    `nodes`: per-node total and available resources, in Ray's units (CPU and GPU counts, memory in
    bytes, custom resources). `quotas`: per-user caps on the sum of admitted demand, same units.
    `preemption`: when given, a head that cannot start may name victims (`Decision.preempt`; see the
    module docstring and `pick_victims`); the head itself is admitted in a later pass, once they left.
    Returns the ids to admit, in order, plus a reason and a 1-based queue position for every job left
    waiting (the policy is in the module docstring). Stateless: each call is a full pass.

    Cost, for J jobs, N nodes, K resource kinds, S distinct gang shapes and A admissions in the pass:
    O(J log J) to order the queue, O(N K) to set up the capacity views, then O(K) and one reason
    string per waiting job. Placement work is memoized per shape between two admissions (capacity does
    not change in between, so each fit, backfill check and reason is computed once per shape), and a
    first-fit search resumes where the last committed search for the same bundle stopped (capacity only
    shrinks during a pass), so a node is skipped at most once per distinct bundle. Worst case
    O(J log J + (A + 1) S N K); in practice near J log J: the benchmark's 10,000 queued jobs on 256
    nodes (S = 24, A = 443) take about 50-60 ms of CPU per pass on a loaded 2-core machine
    (BENCHMARKS.md, "Scheduler and submission"; the previous version took 20-55 s).
    """
    quotas = quotas or {}
    was_admitted = {j.job_id for j in jobs if j.admitted}
    # Keyed by the bundles tuple (hashed in C; the dataclass's own hash and == run in Python).
    shapes: dict[tuple, _Shape] = {}
    shape_get = shapes.get

    # Capacity net of admitted gangs (placed or not), simulated on node totals.
    reserved = _Caps([dict(n.total) for n in nodes])
    used: dict[str, Res] = {}
    for j in jobs:
        if j.admitted:
            s = shape_get(j.demand.bundles) or shapes.setdefault(j.demand.bundles, _Shape(j.demand))
            if not reserved.pack(s):
                reserved.spill(s.total)
            _use(used, j.user, s.total)
    free = _Caps([{k: min(n.available.get(k, 0.0), r.get(k, 0.0)) for k in set(n.total) | set(r)}
                  for n, r in zip(nodes, reserved.caps, strict=True)])
    totals = _Caps([dict(n.total) for n in nodes])
    dec = Decision()
    reasons, positions = dec.reasons, dec.positions
    # Memos valid until the next admission (the only thing that changes capacity or usage in a pass).
    memo: dict[_Shape, str] = {}              # a ready job's reason, without the "N jobs ahead" tail
    over: dict[tuple[str, _Shape], str | None] = {}  # quota verdicts
    sums: Res = {}                            # free per resource, negatives included
    free_sums: list[Res] = []                 # [free per resource, negatives as 0], for reasons

    def admitted(j: Job, s: _Shape) -> None:
        dec.admit.append(j.job_id)
        positions.pop(j.job_id, None)
        j.admitted = True
        if not reserved.pack(s):
            reserved.spill(s.total)
        _use(used, j.user, s.total)
        memo.clear()
        over.clear()
        sums.clear()
        free_sums.clear()

    def why(s: _Shape) -> str:
        if not free_sums:
            free_sums.append(free.free_sums())
        return _shortfall_text(s, free_sums[0])

    def blocked(j: Job, s: _Shape, ahead: int) -> str | None:
        """The quota or can-never-fit reason that takes `j` out of the running, else None."""
        if j.user in quotas:
            key = (j.user, s)
            if key not in over:
                over[key] = _over_quota(j.user, s.total, used, quotas)
            if over[key]:
                return over[key]
        if s.never is None:
            s.never = not totals.trial(s)
            if s.never:
                s.never_text = never_fit_reason(s.demand.as_dicts(), [dict(n.total) for n in nodes])
        return _tail(s.never_text, ahead) if s.never else None

    # The order of `order_key`, by stable sorts on one field each (no key tuples to allocate):
    # id, then submission time, then priority (reverse=True keeps equal keys in their order).
    queue = sorted((j for j in jobs if not j.admitted), key=_by_id)
    queue.sort(key=_by_time)
    queue.sort(key=_by_priority, reverse=True)
    def shape_of(d: Demand) -> _Shape:
        return shape_get(d.bundles) or shapes.setdefault(d.bundles, _Shape(d))

    def start(j: Job, s: _Shape) -> bool:
        """Admit `j` at its full gang if it fits now, else (a worker range) at its largest smaller one."""
        if (not j.sizes or j.user not in quotas or not _over_quota(j.user, s.total, used, quotas)) and free.pack(s):
            admitted(j, s)
            return True
        return smaller(j)

    def smaller(j: Job) -> bool:
        """A worker range: start it at the largest smaller gang that fits now and passes its quota."""
        for n, d in j.sizes:
            s2 = shape_of(d)
            if j.user in quotas and _over_quota(j.user, s2.total, used, quotas):
                continue
            if free.pack(s2):
                admitted(j, s2)
                dec.workers[j.job_id] = n
                return True
        return False

    it = iter(queue)
    ahead = 0
    head: Job | None = None
    head_shape: _Shape | None = None
    # 1. Until a job cannot start, each job either starts or becomes the head (or is out of the running).
    for j in it:
        jid = j.job_id
        positions[jid] = ahead + 1
        s = shape_of(j.demand)
        least = shape_of(j.sizes[-1][1]) if j.sizes else s  # a range: its smallest gang decides "never"
        b = blocked(j, least, ahead)
        if b is not None:
            # Quota: it must not hold the queue hostage. Never fits: an autoscaler may add nodes.
            reasons[jid] = b
            ahead += 1
        elif j.ready and start(j, s):
            pass
        else:
            head, head_shape = j, least
            reasons[jid] = _tail(why(least) if j.ready else "starting its driver", ahead)
            ahead += 1
            break
    if head is None or head_shape is None:
        return dec
    turn = f"waiting for its turn behind {head.job_id}"

    def backfill(j: Job, s: _Shape) -> str | None:
        """Start `j` at gang `s` if it fits now and the head still fits after it; else why not."""
        r = memo.get(s)
        if r is None:
            fits_sum = True  # the cheap pre-check: the cluster-wide sums suffice
            for k, v in s.total.items():
                if v > 0:
                    t = sums.get(k)
                    if t is None:
                        t = sums[k] = free.sum(k)
                    if t + EPS < v:
                        fits_sum = False
                        break
            if fits_sum and reserved.trial(s, head_shape):
                if free.pack(s):
                    admitted(j, s)
                    return None
                r = why(s)
            else:
                # It may fit now, but starting it could delay the job at the head of the queue.
                r = turn if free.trial(s) else why(s)
            memo[s] = r
        return r

    # 2. Backfill: a later job starts only if it fits now and the head still fits after it.
    for j in it:
        jid = j.job_id
        positions[jid] = ahead + 1
        s = shape_of(j.demand)
        least = shape_of(j.sizes[-1][1]) if j.sizes else s
        if least.never is not False or (quotas and j.user in quotas):
            b = blocked(j, least, ahead)
            if b is not None:
                reasons[jid] = b
                ahead += 1
                continue
        if not j.ready:
            reasons[jid] = _tail("starting its driver", ahead)
            ahead += 1
            continue
        if j.sizes and j.user in quotas and _over_quota(j.user, s.total, used, quotas):
            r: str | None = "over quota at its largest size"
        else:
            r = backfill(j, s)
        for n, d in j.sizes if r is not None else ():
            s2 = shape_of(d)
            if j.user in quotas and _over_quota(j.user, s2.total, used, quotas):
                continue
            if backfill(j, s2) is None:
                dec.workers[jid] = n
                r = None
                break
        if r is None:
            continue
        reasons[jid] = f"{r}; {ahead} jobs ahead" if ahead != 1 else f"{r}; 1 job ahead"
        ahead += 1
    if preemption is not None and head.ready:
        _preempt(dec, head, head_shape, [j for j in jobs if j.job_id in was_admitted], nodes, preemption)
    return dec


def pick_victims(head: Demand, admitted: list[Job], nodes: list[Node], min_gap: int, priority: int,
                 max_combinations: int = 4096) -> list[Job] | None:
    """The fewest, lowest-priority admitted jobs whose leaving lets gang `head` pack onto the nodes.

    Candidates are the admitted jobs that are `preemptible`, not already `preempting`, and at most
    `priority - min_gap`. Capacity is each node's total net of every admitted gang that stays (jobs
    already `preempting` count as gone). Sets are tried smallest first; among sets of one size, the
    one whose priorities, highest first, are lowest wins (then the more recently submitted, which
    loses the least work), trying at most `max_combinations` sets per size exactly before falling back
    to greedy (lowest priority first until the head fits, then dropping victims the rest make
    redundant, highest priority first).

    Args:
        head: the waiting job's gang (a worker range: its smallest).
        admitted: every admitted job (candidates or not).
        nodes: the cluster's nodes (only their totals are used).
        min_gap: minimum priority difference between the waiting job and a victim (>= 1).
        priority: the waiting job's priority.
        max_combinations: exact-search budget per set size.

    Returns:
        [] when the jobs already preempting make room, the victims (lowest priority first), or None
        when no set of candidates makes room. O(C^k) packings for C candidates and k victims, capped.
    """
    staying = [j for j in admitted if not j.preempting]
    cand = [j for j in staying if j.preemptible and j.priority <= priority - max(1, min_gap)]
    cand.sort(key=lambda j: (j.priority, -j.submitted_at, j.job_id))
    head_shape = _Shape(head)
    cache: dict[tuple, _Shape] = {}

    def fits_without(gone: set[str]) -> bool:
        caps = _Caps([dict(n.total) for n in nodes])
        for j in staying:
            if j.job_id in gone:
                continue
            s = cache.get(j.demand.bundles) or cache.setdefault(j.demand.bundles, _Shape(j.demand))
            if not caps.pack(s):
                caps.spill(s.total)
        return caps.trial(head_shape)

    if fits_without(set()):
        return []
    if not cand or not fits_without({j.job_id for j in cand}):
        return None

    def rank(c: tuple[Job, ...]) -> tuple:
        return (tuple(sorted((j.priority for j in c), reverse=True)), tuple(-j.submitted_at for j in c))

    for k in range(1, len(cand) + 1):
        sets: list[tuple[Job, ...]] = []
        for n, c in enumerate(combinations(cand, k)):
            if n >= max_combinations:
                sets = []
                break
            sets.append(c)
        if not sets:
            break  # too many to try exactly: greedy below
        for c in sorted(sets, key=rank):
            if fits_without({j.job_id for j in c}):
                return list(c)
    chosen = []
    for j in cand:
        chosen.append(j)
        if fits_without({v.job_id for v in chosen}):
            break
    for j in sorted(chosen, key=lambda j: -j.priority):
        rest = {v.job_id for v in chosen if v is not j}
        if rest and fits_without(rest):
            chosen.remove(j)
    return chosen


def _preempt(dec: Decision, head: Job, head_shape: _Shape, admitted: list[Job], nodes: list[Node],
             p: Preemption) -> None:
    """Name the head's victims in `dec.preempt` and say so in its reason (see `pick_victims`)."""
    victims = pick_victims(head_shape.demand, admitted, nodes, p.min_gap, head.priority, p.max_combinations)
    if victims is None:
        return
    reason = dec.reasons.get(head.job_id, "")
    if victims:
        for v in victims:
            dec.preempt[v.job_id] = head.job_id
        names = ", ".join(v.job_id for v in victims)
        dec.reasons[head.job_id] = f"preempting {names} (lower priority) to make room; {reason}"
    else:
        gone = [j.job_id for j in admitted if j.preempting]
        if not gone:  # it fits the totals already: it waits for capacity that is in use outside raybig
            return
        dec.reasons[head.job_id] = f"waiting for preempted {', '.join(gone)} to checkpoint and stop; {reason}"


def _tail(reason: str, ahead: int) -> str:
    return f"{reason}; {ahead} jobs ahead" if ahead != 1 else f"{reason}; 1 job ahead"
