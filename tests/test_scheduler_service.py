"""The scheduler actor's tick without Ray: at 10,000 queued jobs its non-policy work follows what changed."""

from __future__ import annotations

import time

import pytest
from ray.job_submission import JobStatus
from scheduler_fakes import JobDetails, job_metadata

from raybig.scheduler import service
from raybig.scheduler.meta import Phase
from raybig.scheduler.policy import Decision, Node

pytestmark = pytest.mark.unit
N = 10_000




class FakeRay:
    """A job table of N alive jobs (as the State API lists them) and a KV of ended ones."""

    def __init__(self) -> None:
        self.alive = {f"raybig-j{i}": (JobStatus.RUNNING, job_metadata(i)) for i in range(N)}
        self.ended: dict[str, tuple[JobStatus, dict[str, str]]] = {}
        self.lookups: list[str] = []

    def list_alive(self) -> dict[str, tuple[JobStatus, dict[str, str]]]:
        return {k: (s, dict(md)) for k, (s, md) in self.alive.items()}  # fresh dicts, like each listing

    def lookup(self, ids):
        ids = list(ids)
        self.lookups += ids
        return {j: self.ended[j] for j in ids if j in self.ended}

    def end(self, jid: str) -> None:
        self.ended[jid] = (JobStatus.SUCCEEDED, self.alive.pop(jid)[1])


def _core(fake: FakeRay, monkeypatch, decide=None):
    lines: list[str] = []
    monkeypatch.setattr(service, "scheduler_observe", lambda jobs, newly: None)
    if decide is not None:
        monkeypatch.setattr(service, "decide", decide)
    core = service.SchedulerCore(fake.list_alive, fake.lookup, lambda: [Node({"CPU": 4.0}, {"CPU": 4.0})] * 8,
                                 quotas=lambda: {}, log=lines.append)
    core._recovering = False
    return core, lines


def test_tick_parses_metadata_once_and_looks_up_only_vanished_jobs(monkeypatch):
    fake = FakeRay()
    core, _ = _core(fake, monkeypatch)
    core.tick()
    assert core.parses == N
    core.tick()
    assert core.parses == N, "an unchanged table must not be parsed again"
    assert fake.lookups == []
    # Three jobs end, two arrive: two parses, and only the three vanished ids are looked up.
    for i in range(3):
        core.heartbeat(f"raybig-j{i}", Phase.RUNNING, {})
        fake.end(f"raybig-j{i}")
    fake.alive.update({f"raybig-new{i}": (JobStatus.PENDING, job_metadata(N + i)) for i in range(2)})
    core.tick()
    assert core.parses == N + 2
    assert sorted(fake.lookups) == [f"raybig-j{i}" for i in range(3)]
    assert not any(f"raybig-j{i}" in core.snapshot()["regs"] for i in range(3))  # reservations freed


def test_audit_line_names_only_changes(monkeypatch):
    fake = FakeRay()
    admit = ["raybig-j1"]
    core, lines = _core(fake, monkeypatch, decide=lambda jobs, nodes, quotas, *_: Decision(admit=list(admit)))
    core.tick()
    assert len(lines) == 1 and f"{N} jobs" in lines[0]
    lines.clear()
    admit[:] = ["raybig-j2"]
    core.heartbeat("raybig-j5", Phase.WAITING, {})  # one job changed (it is ready now)
    core.tick()
    assert len(lines) == 1 and len(lines[0]) < 300, lines[0][:300]
    assert "raybig-j5" in lines[0] and "raybig-j7" not in lines[0]


def test_steady_tick_overhead_at_10k_jobs(monkeypatch):
    """Benchmark-style: the non-policy part of a steady tick at 10,000 jobs (decide stubbed out)."""
    fake = FakeRay()
    core, _ = _core(fake, monkeypatch, decide=lambda jobs, nodes, quotas, *_: Decision())
    core.tick()
    t0 = time.perf_counter()
    for _ in range(3):
        core.tick()
    per_tick = (time.perf_counter() - t0) / 3
    print(f"steady tick, 10,000 jobs, decide stubbed: {per_tick * 1000:.0f} ms")
    assert per_tick < 0.5  # the 0.5 s tick; ~60-120 ms on the loaded 2-core box (listing copies included)


# --- the client side: `raybig list --all` / `queue` without a log read per job ------------------------



def test_list_all_shows_the_holders_cause_from_rays_message(monkeypatch):
    """A failed job's cause comes from the log tail in Ray's own message: no log read for it; only
    raybig jobs Ray runs (queued or running holders) have their logs read."""
    from raybig.scheduler import client
    from raybig.scheduler.meta import state_line
    from raybig.scheduler.policy import JobState

    tail = "\n".join([state_line(JobState.RUNNING, attempt=1, of=1),
                      state_line(JobState.FAILED, attempts=1, error="TrainingFailed: training failed (not "
                                 "retried: a restart cannot fix this): FileNotFoundError: data.path 'x' "
                                 "matched no files (rank 0)"),
                      "[raybig] failed after 1 attempt(s): TrainingFailed: ..."])
    jobs = [JobDetails("raybig-failed", "FAILED", job_metadata(1), "Job entrypoint command failed with exit code 1, last "
                     "available logs (truncated to 20,000 chars):\n" + tail),
            JobDetails("raybig-crashed", "FAILED", job_metadata(2), "Job entrypoint command failed with exit code 1, last "
                     "available logs (truncated to 20,000 chars):\nTraceback (most recent call last):\n"
                     "  File \"x.py\", line 1\nModuleNotFoundError: No module named 'raybig'"),
            JobDetails("raybig-queued", "RUNNING", job_metadata(3)),
            JobDetails("raybig-waiting", "PENDING", job_metadata(4)),
            JobDetails("other", "FAILED", None, "Job entrypoint command failed with exit code 3.")]
    fetched: list[str] = []

    class Fake:
        def list_jobs(self):
            return jobs

        def get_job_logs(self, jid):
            fetched.append(jid)
            return state_line(JobState.QUEUED, position=1, reason="waiting for 2 CPU")

    monkeypatch.setattr(client, "connect", lambda address: (Fake(), "http://fake:8265"))
    views = {v.job_id: v for v in client.list_views(None, include_all=True)}
    assert fetched == ["raybig-queued"]
    assert views["raybig-failed"].error.startswith("TrainingFailed: training failed (not retried")
    assert "FileNotFoundError: data.path 'x' matched no files" in views["raybig-failed"].error
    assert views["raybig-crashed"].error == "ModuleNotFoundError: No module named 'raybig'"
    assert views["other"].error == "Job entrypoint command failed with exit code 3."
    assert views["raybig-queued"].state is JobState.QUEUED and views["raybig-queued"].reason == "waiting for 2 CPU"
    # Positions from the table order: priority 1 (raybig-waiting) before priority 0.
    assert [views["raybig-queued"].position, views["raybig-waiting"].position] == [2, 1]
