"""The scheduling policy (pure): order, gang admission, pending reservations, backfill, quotas."""

from __future__ import annotations

import pytest

from raybig.scheduler.meta import demand_of
from raybig.scheduler.policy import Demand, Job, JobState, Node, decide

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
