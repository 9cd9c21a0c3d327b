"""The scheduling policy (pure): order, gang admission, pending reservations, backfill, quotas."""

from __future__ import annotations

import copy
import pathlib
import random

import pytest

from raybig.scheduler.meta import demand_of
from raybig.scheduler.policy import EPS, Decision, Demand, Job, JobState, Node, decide, never_fit_reason

pytestmark = pytest.mark.unit


def node(cpu: float, free: float | None = None, **extra: float) -> Node:
    return Node({"CPU": cpu, **extra}, {"CPU": cpu if free is None else free, **extra})


def job(jid: str, pri: int, workers: int, cpu: float = 1, t: float = 0, **kw) -> Job:
    return Job(jid, pri, t, Demand.of(workers, {"CPU": cpu}), **kw)


def test_priority_then_submission_order_one_at_a_time():
    jobs = [job("a", 1, 2, t=1), job("b", 5, 2, t=2), job("c", 3, 2, t=3), job("d", 5, 2, t=4)]
    d = decide(jobs, [node(2)])
    assert d.admit == ["b"]
    assert d.positions == {"d": 1, "c": 2, "a": 3}
    assert d.reasons["a"] == "waiting for 2 CPU; 2 jobs ahead"


def test_gang_is_all_or_nothing_across_nodes():
    # 2 free CPUs in total, but bundles of 2 CPU: no node has room for one, so nothing is placed.
    d = decide([Job("g", 0, 0, Demand.of(1, {"CPU": 2}))], [node(4, free=1), node(4, free=1)])
    assert d.admit == [] and "waiting for a node with 2 CPU free" in d.reasons["g"]


def test_admitted_gang_not_yet_placed_is_reserved():
    # Ray still shows everything free (the first job's workers haven't appeared), but it's admitted.
    jobs = [job("first", 0, 2, admitted=True), job("second", 0, 2, t=1)]
    d = decide(jobs, [node(3)])
    assert d.admit == [] and "waiting for 2 CPU" in d.reasons["second"]


def test_not_ready_head_keeps_its_turn():
    jobs = [job("hi", 9, 2, ready=False), job("lo", 1, 2, t=1)]
    d = decide(jobs, [node(3)])
    assert d.admit == [] and d.reasons["hi"].startswith("starting its driver")


def test_backfill_only_into_capacity_the_head_cannot_use():
    # 8 CPUs, 2 used by something outside raybig: the 8-CPU head waits; a 1-CPU job may not take
    # capacity the head needs once that frees...
    d = decide([job("big", 5, 8), job("small", 1, 1, t=1)], [node(8, free=6)])
    assert d.admit == []
    # ...but with 10 CPUs the head can never use the extra 2, so a small job backfills them.
    d = decide([job("big", 5, 8), job("small", 1, 1, t=1)], [node(10, free=7)])
    assert d.admit == ["small"] and "big" in d.reasons


def test_job_that_can_never_fit_does_not_block_the_queue():
    d = decide([job("huge", 9, 64), job("ok", 1, 1, t=1)], [node(4)])
    assert d.admit == ["ok"] and "can never fit" in d.reasons["huge"]


def test_a_gang_that_can_never_fit_says_what_is_missing():
    """The reason names the missing resource: per bundle (no node that large), or in all."""
    gpu = Job("gpu", 0, 0.0, Demand.of(1, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 0.5}))
    wide = Job("wide", 0, 1.0, Demand.of(2, {"CPU": 3.0}))
    big = Job("big", 0, 2.0, Demand.of(1, {"CPU": 8.0}))
    d = decide([gpu, wide, big], [node(4), node(2)])
    assert d.reasons["gpu"].startswith("can never fit the current nodes: a bundle needs 1 GPU; no node has any GPU")
    assert "its 2 bundles do not pack onto the 2 node(s)" in d.reasons["wide"]  # 6 CPU in all, not as 2 x 3
    assert "a bundle needs 8 CPU; the most one node has is 4 CPU" in d.reasons["big"]
    d = decide([Job("many", 0, 0.0, Demand.of(4, {"CPU": 2.0}))], [node(4), node(2)])
    assert "8 CPU in all; the 2 node(s) have 6 CPU" in d.reasons["many"]


def test_a_sweep_is_admitted_only_when_its_concurrent_trial_gangs_fit():
    """Issue 18.3: driver + max_concurrent_trials x (trial trainable + workers), all at once."""
    from raybig.spec import load_spec_text

    base = pathlib.Path(__file__).resolve().parent.parent / "jobs" / "debug.yaml"
    sweep = load_spec_text(f"kind: sweep\nname: s\nbase: {base}\nmax_concurrent_trials: 2\nnum_samples: 4\n"
                           "search:\n  train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n", source="s.yaml")
    d = demand_of(sweep)
    assert sorted(d.as_dicts(), key=str) == sorted([{"CPU": 1.0}] * 4 + [{"CPU": 0.01}] * 2 + [{"CPU": 0.5}],
                                                   key=str)
    one_trial_free = [Node({"CPU": 4.0}, {"CPU": 2.6})]
    dec = decide([Job("sweep", 0, 0.0, d)], one_trial_free)
    assert dec.admit == [] and "waiting for" in dec.reasons["sweep"]
    assert decide([Job("sweep", 0, 0.0, d)], [Node({"CPU": 5.0}, {"CPU": 5.0})]).admit == ["sweep"]
    # A searched worker count counts at its largest value.
    wide = load_spec_text(f"kind: sweep\nname: s\nbase: {base}\nmax_concurrent_trials: 1\nnum_samples: 2\n"
                          "search:\n  resources.workers: {choice: [1, 3]}\n", source="s.yaml")
    assert demand_of(wide).total() == {"CPU": 3 + 0.01 + 0.5}


def test_quota_caps_a_users_concurrent_cpus():
    jobs = [job("a1", 0, 2, user="alice", admitted=True), job("a2", 5, 2, t=1, user="alice"),
            job("b1", 0, 2, t=2, user="bob")]
    d = decide(jobs, [node(8)], quotas={"alice": {"CPU": 3}})
    assert d.admit == ["b1"] and "over quota for alice" in d.reasons["a2"]


def test_demand_of_a_train_spec_includes_custom_resources_and_driver():
    from raybig.spec import load_spec_text

    spec = load_spec_text("kind: train\nname: x\nmodel: {preset: gpt-debug}\ndata: {seq_len: 32}\n"
                          "resources: {workers: 2, cpus_per_worker: 1, custom: {rbnode: 1}}\n")
    bundles = demand_of(spec).as_dicts()
    assert bundles.count({"CPU": 1.0, "rbnode": 1.0}) == 2 and {"CPU": 0.5} in bundles


def test_states_are_one_enum_with_terminal_states():
    assert {s for s in JobState if s.is_terminal} == {JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED}


# --- differential test: the fast `decide` against a verbatim copy of the original one -------------
# `_reference_decide` and its helpers are the policy as it was before the scaling rewrite (O(jobs x
# nodes) per pass and worse), kept here unchanged as the specification of the outcome: admissions,
# their order, every reason text and every queue position must match exactly.
# benchmarks/scheduler_submit.py --reference times it for the "before" column of BENCHMARKS.md.

def _ref_order_key(j):
    return (-j.priority, j.submitted_at, j.job_id)


def _ref_num(v):
    if v >= 2**20 and v == int(v):
        return f"{v / 2**30:.1f}GiB" if v >= 2**30 else f"{v / 2**20:.0f}MiB"
    return f"{v:g}"


def _ref_fits(b, cap):
    return all(cap.get(k, 0.0) + EPS >= v for k, v in b.items() if v > 0)


def _ref_take(b, cap):
    for k, v in b.items():
        cap[k] = cap.get(k, 0.0) - v


def _ref_pack(bundles, caps):
    trial = [dict(c) for c in caps]
    for b in sorted(bundles, key=lambda b: -sum(b.values())):
        for c in trial:
            if _ref_fits(b, c):
                _ref_take(b, c)
                break
        else:
            return False
    caps[:] = trial
    return True


def _ref_shortfall(d, caps):
    need, free = d.total(), {}
    for c in caps:
        for k, v in c.items():
            free[k] = free.get(k, 0.0) + max(v, 0.0)
    short = [f"{_ref_num(need[k])} {k}" for k in sorted(need) if need[k] > free.get(k, 0.0) + EPS]
    if short:
        return "waiting for " + " + ".join(short)
    b = max(d.as_dicts(), key=lambda x: sum(x.values()))
    return "waiting for a node with " + " + ".join(f"{_ref_num(v)} {k}" for k, v in sorted(b.items()) if v) + " free"


def _ref_over_quota(j, used, quotas):
    cap = quotas.get(j.user)
    if not cap:
        return None
    mine, need = used.get(j.user, {}), j.demand.total()
    for k, limit in cap.items():
        if mine.get(k, 0.0) + need.get(k, 0.0) > limit + EPS:
            return f"over quota for {j.user}: {k} {_ref_num(mine.get(k, 0.0))} in use + {_ref_num(need.get(k, 0.0))} > {_ref_num(limit)}"
    return None


def _reference_decide(jobs, nodes, quotas=None):
    quotas = quotas or {}
    reserved = [dict(n.total) for n in nodes]
    used = {}
    for j in jobs:
        if j.admitted:
            _ref_pack(j.demand.as_dicts(), reserved) or _ref_spill(j.demand, reserved)
            u = used.setdefault(j.user, {})
            for k, v in j.demand.total().items():
                u[k] = u.get(k, 0.0) + v
    free = [{k: min(n.available.get(k, 0.0), r.get(k, 0.0)) for k in set(n.total) | set(r)}
            for n, r in zip(nodes, reserved, strict=True)]
    totals = [dict(n.total) for n in nodes]
    never = {}
    dec = Decision()
    head = None
    ahead = 0
    for j in sorted((j for j in jobs if not j.admitted), key=_ref_order_key):
        dec.positions[j.job_id] = ahead + 1
        q = _ref_over_quota(j, used, quotas)
        if q:
            dec.reasons[j.job_id] = q
            ahead += 1
            continue
        if j.demand not in never:
            never[j.demand] = not _ref_pack(j.demand.as_dicts(), [dict(t) for t in totals])
        if never[j.demand]:
            dec.reasons[j.job_id] = _ref_why(j, free, True, ahead, totals)
            ahead += 1
            continue
        if head is None:
            if j.ready and _ref_pack(j.demand.as_dicts(), free):
                _ref_admit(j, dec, reserved, used)
                continue
            head = j
            dec.reasons[j.job_id] = _ref_why(j, free, False, ahead)
        elif j.ready and _ref_fits_sum(j.demand, free) and _ref_backfill_ok(j, head, reserved) \
                and _ref_pack(j.demand.as_dicts(), free):
            _ref_admit(j, dec, reserved, used)
            continue
        elif j.ready and _ref_pack(j.demand.as_dicts(), [dict(f) for f in free]):
            dec.reasons[j.job_id] = f"waiting for its turn behind {head.job_id}; {ahead} job" \
                                    f"{'s' if ahead != 1 else ''} ahead"
        else:
            dec.reasons[j.job_id] = _ref_why(j, free, False, ahead)
        ahead += 1
    return dec


def _ref_fits_sum(d, caps):
    for k, v in d.total().items():
        if v > 0 and sum(c.get(k, 0.0) for c in caps) + EPS < v:
            return False
    return True


def _ref_why(j, free, never, ahead, totals=None):
    if never:
        r = never_fit_reason(j.demand.as_dicts(), totals)  # the text (what is missing) is the new one
    elif not j.ready:
        r = "starting its driver"
    else:
        r = _ref_shortfall(j.demand, free)
    return f"{r}; {ahead} job{'s' if ahead != 1 else ''} ahead"


def _ref_admit(j, dec, reserved, used):
    dec.admit.append(j.job_id)
    dec.positions.pop(j.job_id, None)
    j.admitted = True
    _ref_pack(j.demand.as_dicts(), reserved) or _ref_spill(j.demand, reserved)
    u = used.setdefault(j.user, {})
    for k, v in j.demand.total().items():
        u[k] = u.get(k, 0.0) + v


def _ref_backfill_ok(j, head, reserved):
    after = [dict(r) for r in reserved]
    if not _ref_pack(j.demand.as_dicts(), after):
        return False
    return _ref_pack(head.demand.as_dicts(), after)


def _ref_spill(d, caps):
    if caps:
        _ref_take(d.total(), caps[0])
    return True


_GiB = float(2**30)


def _random_bundle(rng: random.Random) -> dict[str, float]:
    b: dict[str, float] = {"CPU": rng.choice([0.0, 0.5, 1.0, 1.0, 2.0, 3.0, 4.0])}
    if rng.random() < 0.25:
        b["GPU"] = rng.choice([0.0, 0.25, 0.5, 1.0, 1.0, 2.0])
    if rng.random() < 0.2:
        b["memory"] = rng.choice([1, 2, 4, 8]) * _GiB
    if rng.random() < 0.05:
        b[rng.choice(["rbnode", "accel"])] = rng.choice([0.0, 1.0, 1.0, 2.0])
    return b


def _random_demand(rng: random.Random) -> Demand:
    r = rng.random()
    if r < 0.75:  # the usual shape: identical workers plus maybe a driver share
        driver = rng.choice([None, {"CPU": 0.5}, {"CPU": 0.0}, {"CPU": 1.0, "memory": _GiB}])
        return Demand.of(rng.choice([0, 1, 1, 2, 2, 3, 4, 6]), _random_bundle(rng), driver)
    # heterogeneous bundles (and equal-sum ties: the packing order is a stable sort)
    return Demand(tuple(tuple(sorted(_random_bundle(rng).items())) for _ in range(rng.randint(0, 4))))


def _random_scenario(rng: random.Random, n_nodes: int, n_jobs: int):
    nodes = []
    for _ in range(n_nodes):
        total = {"CPU": rng.choice([0.0, 2.0, 4.0, 8.0, 8.0, 16.0])}
        if rng.random() < 0.6:
            total["GPU"] = rng.choice([1.0, 2.0, 4.0])
        if rng.random() < 0.6:
            total["memory"] = rng.choice([4, 16, 64]) * _GiB
        if rng.random() < 0.3:
            total["rbnode"] = 1.0
        busy = rng.random() < 0.5  # something outside raybig uses part of the node
        avail = {k: rng.choice([v, v * 0.5, max(v - 1.0, 0.0), max(v - 2.0, 0.0), 0.0]) if busy else v
                 for k, v in total.items()}
        if rng.random() < 0.1:
            avail["accel"] = 1.0  # reported available, but not in total: ignored
        if rng.random() < 0.1:
            avail.pop(rng.choice(list(avail)), None)
        nodes.append(Node(total, avail))
    pool = [_random_demand(rng) for _ in range(rng.randint(1, 5))]  # jobs share gang shapes
    jobs = []
    for i in range(n_jobs):
        d = rng.choice(pool) if rng.random() < 0.7 else _random_demand(rng)
        jobs.append(Job(f"j{i}", rng.choice([0, 0, 1, 2, 5]), float(rng.choice([0, 1, 2, i])), d,
                        user=rng.choice(["", "alice", "bob", "carol"]), ready=rng.random() < 0.85,
                        admitted=rng.random() < 0.25))
    rng.shuffle(jobs)
    quotas: dict[str, dict[str, float]] = {}
    for u in ("alice", "bob", "nobody"):
        if rng.random() < 0.4:
            quotas[u] = {rng.choice(["CPU", "GPU", "memory"]): rng.choice([0.0, 2.0, 4.0, 8.0, 16 * _GiB])}
    return jobs, nodes, quotas or None


def _same(jobs, nodes, quotas) -> None:
    mine, theirs = copy.deepcopy(jobs), copy.deepcopy(jobs)
    got, want = decide(mine, nodes, quotas), _reference_decide(theirs, nodes, quotas)
    assert got.admit == want.admit
    assert list(got.reasons.items()) == list(want.reasons.items())
    assert list(got.positions.items()) == list(want.positions.items())
    assert [j.admitted for j in mine] == [j.admitted for j in theirs]


def test_differential_small_random_scenarios_match_the_reference():
    rng = random.Random(20261130)
    for _ in range(1500):
        jobs, nodes, quotas = _random_scenario(rng, rng.randint(0, 5), rng.randint(0, 14))
        _same(jobs, nodes, quotas)


def test_differential_medium_scenarios_match_the_reference():
    # More jobs than fit, many admissions per pass: exercises the memos across capacity changes.
    rng = random.Random(7)
    for _ in range(25):
        jobs, nodes, quotas = _random_scenario(rng, rng.randint(6, 24), rng.randint(60, 200))
        _same(jobs, nodes, quotas)


def test_differential_benchmark_generator_matches_the_reference(monkeypatch):
    # The benchmark's own queue (24 gang shapes, quotas, many admissions), at sizes the reference
    # decides in well under a second.
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
    from scheduler_submit import make_scenario

    for n_jobs, n_nodes in ((300, 8), (600, 16)):
        jobs, nodes, quotas = make_scenario(n_jobs, n_nodes)
        _same(jobs, nodes, quotas)
