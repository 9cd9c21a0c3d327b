"""Preemption and worker ranges without Ray: victim choice (policy), the scheduler core's protocol, faults."""

from __future__ import annotations

import json

import pytest
from ray.job_submission import JobStatus
from scheduler_fakes import job_metadata

from raybig.errors import UsageError
from raybig.scheduler import service
from raybig.scheduler.meta import Phase, job_from_metadata, metadata_for
from raybig.scheduler.policy import Demand, Job, JobState, Node, Preemption, decide, pick_victims
from raybig.scheduler.quota import parse_preemption

pytestmark = pytest.mark.unit


def node(cpu: float) -> Node:
    return Node({"CPU": cpu}, {"CPU": cpu})


def run(jid: str, pri: int, workers: int, t: float = 0, preemptible: bool = True, **kw) -> Job:
    """An admitted (running) job of `workers` x 1 CPU."""
    return Job(jid, pri, t, Demand.of(workers, {"CPU": 1.0}), admitted=True, preemptible=preemptible, **kw)


def wait(jid: str, pri: int, workers: int, t: float = 100, **kw) -> Job:
    return Job(jid, pri, t, Demand.of(workers, {"CPU": 1.0}), **kw)


P = Preemption()


def test_fewest_victims_win_over_lower_priority_pairs():
    # One 4-CPU node, full: a (1), b (2), c (1). A 2-CPU job needs room: b alone, not a + c.
    jobs = [run("a", 0, 1, t=1), run("b", 1, 2, t=2), run("c", 0, 1, t=3), wait("hi", 5, 2)]
    d = decide(jobs, [node(4)], preemption=P)
    assert d.admit == [] and d.preempt == {"b": "hi"}
    assert d.reasons["hi"].startswith("preempting b (lower priority) to make room; waiting for 2 CPU")


def test_lowest_priority_first_then_newest():
    jobs = [run("x", 3, 2, t=1), run("y", 1, 2, t=2), wait("hi", 5, 2)]
    assert decide(jobs, [node(4)], preemption=P).preempt == {"y": "hi"}
    # Equal priority: the newer one (least work lost).
    jobs = [run("old", 1, 2, t=1), run("new", 1, 2, t=2), wait("hi", 5, 2)]
    assert decide(jobs, [node(4)], preemption=P).preempt == {"new": "hi"}
    # A pair of low-priority jobs beats one with a higher priority only if no single job makes room.
    jobs = [run("p", 1, 1, t=1), run("q", 1, 1, t=2), run("r", 4, 2, t=3), wait("hi", 5, 2)]
    assert decide(jobs, [node(4)], preemption=P).preempt == {"r": "hi"}  # fewest first
    jobs = [run("p", 1, 1, t=1), run("q", 1, 1, t=2), run("r", 4, 1, t=3), run("s", 4, 1, t=4), wait("hi", 5, 2)]
    assert decide(jobs, [node(4)], preemption=P).preempt == {"p": "hi", "q": "hi"}


def test_not_preemptible_priority_gap_and_equal_priority_are_respected():
    jobs = [run("x", 3, 2, t=1), run("y", 1, 2, t=2, preemptible=False), wait("hi", 5, 2)]
    assert decide(jobs, [node(4)], preemption=P).preempt == {"x": "hi"}
    # min_gap 3: x (gap 2) may not be preempted; y (gap 4) may.
    jobs = [run("x", 3, 2, t=1), run("y", 1, 2, t=2), wait("hi", 5, 2)]
    assert decide(jobs, [node(4)], preemption=Preemption(min_gap=3)).preempt == {"y": "hi"}
    jobs = [run("x", 3, 2, t=1), run("y", 3, 2, t=2), wait("hi", 5, 2)]
    assert decide(jobs, [node(4)], preemption=Preemption(min_gap=3)).preempt == {}
    # Same priority never preempts; without preemption nothing is named.
    jobs = [run("x", 5, 4, t=1), wait("hi", 5, 2)]
    assert decide(jobs, [node(4)], preemption=P).preempt == {}
    assert decide([run("x", 0, 4), wait("hi", 5, 2)], [node(4)]).preempt == {}


def test_no_victim_set_makes_room_then_nobody_is_preempted():
    # 2 nodes of 2 CPU; the head needs one 3-CPU bundle: it can never fit, it is no head, no preemption.
    jobs = [run("x", 0, 2), Job("hi", 5, 100, Demand.of(1, {"CPU": 3.0}))]
    d = decide(jobs, [node(2), node(2)], preemption=P)
    assert d.preempt == {} and "can never fit" in d.reasons["hi"]
    # Room needs x and y, but y is not preemptible: nobody is asked to yield.
    jobs = [run("x", 0, 2), run("y", 0, 2, preemptible=False), wait("hi", 5, 3)]
    assert decide(jobs, [node(4)], preemption=P).preempt == {}


def test_a_job_over_its_quota_preempts_nobody_and_victims_free_the_head_within_its_quota():
    jobs = [run("x", 0, 4, user="bob"), wait("hi", 5, 2, user="alice"), run("a", 0, 1, user="alice")]
    d = decide(jobs, [node(5)], quotas={"alice": {"CPU": 2}}, preemption=P)
    assert d.preempt == {} and "over quota for alice" in d.reasons["hi"]
    d = decide(jobs, [node(5)], quotas={"alice": {"CPU": 3}}, preemption=P)
    assert d.preempt == {"x": "hi"}  # alice's own smaller job is not needed


def test_jobs_already_yielding_are_waited_for_not_doubled():
    jobs = [run("x", 0, 2, t=1, preempting=True), run("y", 0, 2, t=2), wait("hi", 5, 2)]
    d = decide(jobs, [node(4)], preemption=P)
    assert d.preempt == {} and d.reasons["hi"].startswith("waiting for preempted x to checkpoint and stop")
    # Not enough on its way out: one more victim, the fewest that still makes room.
    jobs = [run("x", 0, 1, t=1, preempting=True), run("y", 0, 3, t=2), wait("hi", 5, 3)]
    assert decide(jobs, [node(4)], preemption=P).preempt == {"y": "hi"}


def test_victims_across_nodes_and_the_greedy_fallback():
    # Two 2-CPU nodes; the head's two 2-CPU bundles need both nodes emptied.
    jobs = [run("a", 0, 2, t=1), Job("b", 0, 2, Demand.of(1, {"CPU": 2.0}), admitted=True, preemptible=True),
            Job("hi", 5, 100, Demand.of(2, {"CPU": 2.0}))]
    assert set(decide(jobs, [node(2), node(2)], preemption=P).preempt) == {"a", "b"}
    # Many candidates: the exact search's budget runs out and greedy + pruning still finds 3 of 1 CPU.
    many = [run(f"j{i:02d}", i % 3, 1, t=i) for i in range(12)]
    v = pick_victims(Demand.of(3, {"CPU": 1.0}), many, [node(12)], 1, 9, max_combinations=5)
    assert v is not None and len(v) == 3 and all(j.priority == 0 for j in v)


def test_worker_range_starts_at_the_largest_size_that_fits():
    sizes = tuple((n, Demand.of(n, {"CPU": 1.0}, {"CPU": 0.5})) for n in (3, 2, 1))
    elastic = Job("e", 0, 0, Demand.of(4, {"CPU": 1.0}, {"CPU": 0.5}), sizes=sizes)
    d = decide([run("x", 0, 2), elastic], [node(5)])
    assert d.admit == ["e"] and d.workers == {"e": 2}  # 3 CPU free: 2 workers + the driver's 0.5
    d = decide([Job("e", 0, 0, elastic.demand, sizes=sizes)], [node(8)])
    assert d.admit == ["e"] and d.workers == {}  # the maximum fits: no override
    # A range whose minimum can never fit is refused like any gang; one whose minimum fits is not.
    big = Job("b", 0, 0, Demand.of(8, {"CPU": 1.0}), sizes=((6, Demand.of(6, {"CPU": 1.0})),))
    d = decide([big, wait("ok", 0, 1, t=1)], [node(4)])
    assert "can never fit" in d.reasons["b"] and d.admit == ["ok"]
    fits_min = Job("m", 0, 0, Demand.of(8, {"CPU": 1.0}), sizes=((3, Demand.of(3, {"CPU": 1.0})),))
    d = decide([run("x", 0, 2), fits_min], [node(4)])
    assert "can never fit" not in d.reasons["m"] and d.admit == []
    # As backfill behind a head: a range job starts small in capacity the head cannot use.
    head = Job("h", 9, 0, Demand.of(1, {"CPU": 6.0}))
    small = Job("s", 0, 1, Demand.of(4, {"CPU": 1.0}), sizes=((2, Demand.of(2, {"CPU": 1.0})),))
    d = decide([head, small], [Node({"CPU": 8.0}, {"CPU": 3.0})])
    assert d.admit == ["s"] and d.workers == {"s": 2}


def test_metadata_carries_preemptible_and_kind_defaults():
    from raybig.spec import load_spec_text

    train = load_spec_text("kind: train\nname: t\nmodel: {preset: gpt-debug}\ndata: {seq_len: 32}\n")
    probe = load_spec_text("kind: probe\nname: p\n")
    off = load_spec_text("kind: train\nname: t\nmodel: {preset: gpt-debug}\ndata: {seq_len: 32}\npreemptible: false\n")
    on = load_spec_text("kind: probe\nname: p\npreemptible: true\n")
    got = [job_from_metadata("j", metadata_for(s, "h", "u", 0.0)).preemptible for s in (train, probe, off, on)]
    assert got == [True, False, False, True]
    assert job_from_metadata("j", job_metadata(1)).preemptible is False  # a record from before the field


def test_parse_preemption_settings():
    assert parse_preemption(False, None, None) == {"enabled": False}
    assert parse_preemption(None, "10", "60") == {"min_gap": 10, "grace_s": 60.0}
    for args in ((None, "0", None), (None, "x", None), (None, None, "-1"), (None, None, "nan"), (None, None, None)):
        with pytest.raises(UsageError):
            parse_preemption(*args)


# --- the scheduler core: the protocol and its faults ----------------------------------------------

def _md(name: str, pri: int, t: float, preemptible: bool = True) -> dict[str, str]:
    md = job_metadata(0)
    md.update(raybig_name=name, raybig_priority=str(pri), raybig_submitted_at=f"{t:.6f}",
              raybig_preemptible="1" if preemptible else "0")
    return md


class Table:
    """Ray's job table for a few jobs, and the ones the scheduler stopped."""

    def __init__(self) -> None:
        self.alive = {"low": (JobStatus.RUNNING, _md("low", 0, 1.0)), "high": (JobStatus.RUNNING, _md("high", 5, 2.0))}
        self.stopped: list[str] = []
        self.ended: dict[str, tuple[JobStatus, dict[str, str]]] = {}

    def end(self, jid: str) -> None:
        self.ended[jid] = (JobStatus.SUCCEEDED, self.alive.pop(jid)[1])

    def core(self, lines: list[str], grace_s: float = 60) -> service.SchedulerCore:
        # 3 CPU: one 2 x 1 CPU + 0.5 driver gang at a time.
        return service.SchedulerCore(lambda: dict(self.alive), lambda ids: {j: self.ended[j] for j in ids if j in self.ended},
                                     lambda: [node(3)], quotas=lambda: {},
                                     log=lines.append, stop_job=self.stopped.append,
                                     preemption=lambda: {"enabled": True, "min_gap": 1, "grace_s": grace_s})


def _rec(md: dict[str, str]) -> dict:
    return {"priority": int(md["raybig_priority"]), "submitted_at": float(md["raybig_submitted_at"]),
            "demand": json.loads(md["raybig_demand"]), "user": "u", "preemptible": md["raybig_preemptible"] == "1"}


def test_preemption_protocol_and_a_scheduler_restart_in_the_middle(monkeypatch):
    monkeypatch.setattr(service, "scheduler_observe", lambda jobs, newly: None)
    seen: list[int] = []
    monkeypatch.setattr(service, "scheduler_preempted", seen.append)
    tb, lines = Table(), []
    low, high = _rec(tb.alive["low"][1]), _rec(tb.alive["high"][1])
    core = tb.core(lines)
    core._recovering = False
    core.heartbeat("low", Phase.RUNNING, low, {})
    core.heartbeat("high", Phase.WAITING, high, {})
    core.tick()
    assert core.heartbeat("high", Phase.WAITING, high, {})["admitted"] is False
    ans = core.heartbeat("low", Phase.RUNNING, low, {})
    assert ans["preempt"]["by"] == "high" and ans["preempt"]["grace_s"] == 60
    assert seen == [0] and any("preempt low (priority 0) for high (priority 5)" in ln for ln in lines)
    core.tick()
    core.tick()
    assert core.preemptions == 1, "a victim on its way out is asked once"
    assert core.board()["jobs"]["low"]["reason"] == "preempted for high: checkpointing"

    # The scheduler dies here. Its successor learns from the victim's heartbeat that it is yielding.
    core2 = tb.core(lines)
    core2.heartbeat("low", Phase.RUNNING, low, {"yielding": ans["preempt"]})
    core2.heartbeat("high", Phase.WAITING, high, {})
    core2.tick()  # recovered: every RUNNING Ray job's holder has heartbeated
    assert core2.preemptions == 0 and not core2.heartbeat("high", Phase.WAITING, high, {})["admitted"]
    assert "waiting for preempted low" in core2.snapshot()["reasons"]["high"]
    # The victim checkpointed and is back in the queue (no retry spent): high runs, low waits.
    assert core2.heartbeat("low", Phase.WAITING, low, {"preempted": 1, "preempted_at_step": 7})["admitted"] is False
    core2.tick()
    assert core2.heartbeat("high", Phase.WAITING, high, {})["admitted"] is True
    assert core2.heartbeat("low", Phase.WAITING, low, {"preempted": 1})["admitted"] is False  # not twice
    b = core2.board()["jobs"]
    assert b["low"]["state"] == JobState.PREEMPTED.value and b["low"]["preempted"] == 1
    assert b["high"]["state"] == JobState.RUNNING.value
    core2.heartbeat("high", Phase.RUNNING, high, {})
    core2.tick()
    assert core2.preemptions == 0, "low (lower priority) never preempts high"
    # high ends: low is admitted again and resumes.
    tb.end("high")
    core2.release("high", {"state": "SUCCEEDED"})
    core2.tick()
    assert core2.heartbeat("low", Phase.WAITING, low, {"preempted": 1})["admitted"] is True, core2.snapshot()
    assert tb.stopped == []


def test_a_victim_that_never_yields_is_stopped_after_the_bound(monkeypatch):
    monkeypatch.setattr(service, "scheduler_observe", lambda jobs, newly: None)
    monkeypatch.setattr(service, "HARD_STOP_S", 0.0)
    tb, lines = Table(), []
    low, high = _rec(tb.alive["low"][1]), _rec(tb.alive["high"][1])
    core = tb.core(lines, grace_s=0.05)
    core._recovering = False
    core.heartbeat("low", Phase.RUNNING, low, {})
    core.heartbeat("high", Phase.WAITING, high, {})
    core.tick()
    assert tb.stopped == []
    import time

    time.sleep(0.1)
    core.heartbeat("low", Phase.RUNNING, low, {})  # still running, ignoring the request
    core.tick()
    core.tick()
    assert tb.stopped == ["low"], "stopped once"
    assert any("did not yield" in ln for ln in lines)


def test_worker_range_admission_tells_the_holder_its_size(monkeypatch):
    monkeypatch.setattr(service, "scheduler_observe", lambda jobs, newly: None)
    md = _md("e", 0, 1.0)
    sizes = [[n, Demand.of(n, {"CPU": 1.0}, {"CPU": 0.5}).to_json()] for n in (3, 2, 1)]
    md.update(raybig_demand=json.dumps(Demand.of(4, {"CPU": 1.0}, {"CPU": 0.5}).to_json()),
              raybig_sizes=json.dumps(sizes))
    core = service.SchedulerCore(lambda: {"e": (JobStatus.RUNNING, md)}, lambda ids: {}, lambda: [node(3)],
                                 quotas=lambda: {}, log=lambda _: None)
    core._recovering = False
    rec = {**_rec({**md, "raybig_preemptible": "1"}), "sizes": sizes}
    core.heartbeat("e", Phase.WAITING, rec, {})
    core.tick()
    ans = core.heartbeat("e", Phase.WAITING, rec, {})
    assert ans["admitted"] is True and ans["workers"] == 2
    assert core.board()["usage"]["u"]["CPU"] == 2.5  # 2 workers + the driver


def test_the_loops_watch_polls_on_rank_0_only_and_agrees_at_the_same_steps(monkeypatch):
    from raybig.train import preempt

    reads: list[str] = []
    monkeypatch.setattr(preempt, "requested", lambda jid: reads.append(jid) or len(reads) >= 2)
    monkeypatch.setattr(preempt, "POLL_S", 0.0)
    agreed: list[list[float]] = []

    def agree(v: list[float]) -> list[float]:  # "max" over ranks: rank 1 sends zeros, so rank 0's values
        agreed.append(v)
        return [max(v[0], 0.0), max(v[1], 0.0)]

    w0 = preempt.Watch(0, agree, job_id="j")
    w1 = preempt.Watch(1, lambda v: [1.0, 1.0], job_id="j")  # the all-reduce carries rank 0's values
    assert w0.stop_now(1) is False and w0.stop_now(2) is True and w0.stop_now(3) is True
    assert reads == ["j", "j"], "rank 0 stops reading once it has seen the request"
    assert w1.stop_now(1) is True and reads == ["j", "j"], "other ranks never read the store"
    assert all(v[1] >= 1 for v in agreed), "rank 0 proposes the next check, at least 1 step ahead"
    off = preempt.Watch(0, agree, job_id="")
    n = len(agreed)
    assert off.stop_now(1) is False and len(agreed) == n, "no job id (raybig run): no poll, no collective"


def test_short_steps_agree_every_few_steps_long_steps_every_step(monkeypatch):
    """Rank 0 sizes the gap between agreements to about POLL_S of its step time; all ranks follow it."""
    from raybig.train import preempt

    monkeypatch.setattr(preempt, "requested", lambda jid: False)
    monkeypatch.setattr(preempt, "POLL_S", 0.5)
    clock = [0.0]
    monkeypatch.setattr(preempt.time, "monotonic", lambda: clock[0])

    def run(step_s: float, steps: int) -> list[int]:
        """Steps at which the two ranks agreed (asserted to be the same steps on both)."""
        sent: list[list[float]] = []
        at0: list[int] = []
        at1: list[int] = []
        w0 = preempt.Watch(0, lambda v: sent.append(v) or v, job_id="j")
        w1 = preempt.Watch(1, lambda v: sent[-1], job_id="j")  # the all-reduce hands rank 1 rank 0's values
        for step in range(1, steps + 1):
            clock[0] += step_s
            n = len(sent)
            w0.stop_now(step)
            if len(sent) > n:
                at0.append(step)
            if step >= w1._next:
                at1.append(step)
            w1.stop_now(step)
        assert at0 == at1
        return at0

    short = run(0.01, 300)  # 10 ms steps: ~50 steps per agreement
    assert short[:2] == [1, 2] and all(b - a == 50 for a, b in zip(short[2:], short[3:], strict=False)), short
    assert len(short) < 10
    assert run(2.0, 5) == [1, 2, 3, 4, 5]  # 2 s steps: every step
    fast = run(1e-5, 500)
    assert all(b - a <= preempt.MAX_EVERY for a, b in zip(fast, fast[1:], strict=False))


def test_malformed_preemption_setting_is_one_line_exit_2_before_any_cluster(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAYBIG_HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "raybig", "queue", "preemption", "--min-gap", "0"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.returncode == 2 and len(lines) == 1 and "--min-gap '0': must be >= 1" in lines[0], r.stderr


def test_stored_preemption_settings_override_the_environment_key_by_key(monkeypatch):
    monkeypatch.setenv("RAYBIG_PREEMPT_MIN_GAP", "3")
    monkeypatch.setenv("RAYBIG_PREEMPT_GRACE_S", "30")
    monkeypatch.setattr(service, "stored_preemption", lambda: {"grace_s": 90.0})
    assert service.cluster_preemption() == {"enabled": True, "min_gap": 3, "grace_s": 90.0}
    monkeypatch.setenv("RAYBIG_PREEMPTION", "off")
    assert service.cluster_preemption()["enabled"] is False


def test_a_preempted_attempt_says_so_in_its_result_and_a_resumed_one_does_not():
    from raybig.train.result import TrainResult

    recs = [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.5, "preempted_at_step": 4}]
    stopped = TrainResult.from_history("r", "/tmp/r", recs)
    assert stopped.preempted_at_step == 4 and stopped.to_json()["preempted_at_step"] == 4
    assert "preempted_at_step" not in stopped.metrics
    resumed = TrainResult.from_history("r", "/tmp/r", [*recs, {"step": 8, "loss": 2.0}])
    assert resumed.preempted_at_step is None and "preempted_at_step" not in resumed.metrics
