"""`raybig list/queue` at 10,000 queued jobs: every state, reason and cause from the scheduler's board.

No Ray: the scheduler core is driven with a fake job table, and the client builds its views from a
fake Jobs API listing plus the board, as it does from the dashboard. No job's log is read.
"""

from __future__ import annotations

import json
import time

import pytest
from ray.job_submission import JobStatus
from scheduler_fakes import JobDetails, job_metadata

from raybig.scheduler import client, service
from raybig.scheduler.meta import Phase
from raybig.scheduler.policy import JobState, Node

pytestmark = pytest.mark.unit
N = 10_000






class _NoLogs:
    """A Jobs API client whose log reads fail the test."""

    def __init__(self, jobs: list[JobDetails]):
        self.jobs = jobs

    def list_jobs(self) -> list[JobDetails]:
        return self.jobs

    def get_job_logs(self, jid: str) -> str:
        raise AssertionError(f"read the log of {jid}")


def _queue_of_10k(monkeypatch):
    """A scheduler core after one tick over N alive jobs: a few run, one failed, the rest wait."""
    alive = {f"raybig-j{i}": (JobStatus.RUNNING, job_metadata(i)) for i in range(N)}
    monkeypatch.setattr(service, "scheduler_observe", lambda jobs, newly: None)
    core = service.SchedulerCore(lambda: dict(alive), lambda ids: {}, lambda: [Node({"CPU": 4.0}, {"CPU": 4.0})] * 2,
                                 quotas=lambda: {}, log=lambda line: None)
    core._recovering = False
    for jid, (_, md) in alive.items():
        core.heartbeat(jid, Phase.WAITING, {"priority": int(md["raybig_priority"]), "submitted_at": 0.0,
                                            "demand": json.loads(md["raybig_demand"]), "user": "u"})
    core.tick()  # the 2.5-CPU gangs that fit on 2 x 4 CPU start: the rest wait
    running = [j for j, r in core.snapshot()["regs"].items() if r["admitted"]]
    for jid in running:
        core.heartbeat(jid, Phase.RUNNING, {}, {"attempt": 1, "of": 1, "metrics": {"step": 7, "loss": 2.5}})
    core.release("raybig-failed", {"state": "FAILED", "error": "FileNotFoundError: data.path 'x' matched no files"})
    return core, alive, running


def test_listing_10k_queued_jobs_from_the_board_reads_no_log(monkeypatch, tmp_path):
    core, alive, running = _queue_of_10k(monkeypatch)
    assert 1 <= len(running) < 10  # as many 2.5-CPU gangs as 2 x 4 CPU hold
    t0 = time.perf_counter()
    board = core.board()
    t_board = time.perf_counter() - t0
    # The actor writes it as one file; the client parses it back (as fetch_board does).
    path = tmp_path / "raybig-queue.json"
    body = service.write_board(board, path=str(path))
    assert service.write_board(board, body, path=str(path)) is body  # unchanged: not rewritten
    parsed = json.loads(path.read_text())
    jobs = [JobDetails(jid, "RUNNING", md) for jid, (_, md) in alive.items()]
    jobs.append(JobDetails("raybig-failed", "FAILED", job_metadata(N), "Job entrypoint command failed with exit code 1."))
    monkeypatch.setattr(client, "connect", lambda address: (_NoLogs(jobs), "http://fake:8265"))
    monkeypatch.setattr(client, "fetch_board", lambda c, url: parsed)
    t0 = time.perf_counter()
    views = client.list_views(None, include_all=True)
    t_list = time.perf_counter() - t0
    print(f"board of {N} jobs: {t_board * 1000:.0f} ms; list_views from it: {t_list * 1000:.0f} ms; "
          f"file {path.stat().st_size / 1e6:.1f} MB")
    assert len(views) == N + 1
    by_id = {v.job_id: v for v in views}
    assert [by_id[j].state for j in running] == [JobState.RUNNING] * len(running)
    assert by_id[running[0]].metrics == {"step": 7, "loss": 2.5}
    queued = [v for v in views if v.state is JobState.QUEUED]
    assert len(queued) == N - len(running)
    assert sorted(v.position for v in queued) == list(range(1, len(queued) + 1))
    assert all(v.reason for v in queued)
    assert by_id["raybig-failed"].state is JobState.FAILED
    assert by_id["raybig-failed"].error == "FileNotFoundError: data.path 'x' matched no files"
    assert t_board + t_list < 10  # a loose sanity bound; a few hundred ms on the loaded 2-core box
    # The commands themselves, tables and JSON included (rich would take ~30-60 s at this size).
    from click.testing import CliRunner

    from raybig.cli import main

    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["queue"], catch_exceptions=False)
    t_queue = time.perf_counter() - t0
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == N + 1  # a header, then every active job
    assert r.stdout.splitlines()[1].split()[2] == "RUNNING"
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["list", "--all", "--json"], catch_exceptions=False)
    t_json = time.perf_counter() - t0
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == N + 1
    print(f"raybig queue: {t_queue * 1000:.0f} ms; raybig list --all --json: {t_json * 1000:.0f} ms")
    assert t_queue + t_json < 30  # loose: ~1-2 s on the loaded 2-core box


def test_without_a_board_only_a_few_logs_are_read(monkeypatch):
    """An older scheduler (no board): up to LOG_FALLBACK_MAX holders' logs, never one per queued job."""
    jobs = [JobDetails(f"raybig-j{i}", "RUNNING", job_metadata(i)) for i in range(client.LOG_FALLBACK_MAX + 1)]
    monkeypatch.setattr(client, "connect", lambda address: (_NoLogs(jobs), "http://fake:8265"))
    monkeypatch.setattr(client, "fetch_board", lambda c, url: None)
    views = client.list_views(None)
    assert len(views) == len(jobs) and all(v.state is JobState.PENDING for v in views)


def test_board_states_and_ended_outcomes_are_bounded(monkeypatch):
    monkeypatch.setattr(service, "ENDED_KEEP", 3)
    core = service.SchedulerCore(lambda: {}, lambda ids: {}, lambda: [], quotas=lambda: {}, log=lambda line: None)
    core.heartbeat("a", Phase.BACKOFF, {}, {"attempt": 1, "of": 3, "error": "RuntimeError: boom"})
    for i in range(5):
        core.release(f"e{i}", {"state": "FAILED", "error": f"E{i}"})
    b = core.board()["jobs"]
    assert b["a"] == {"state": "RETRYING", "attempt": 1, "of": 3, "error": "RuntimeError: boom"}
    assert sorted(k for k in b if k.startswith("e")) == ["e2", "e3", "e4"]
