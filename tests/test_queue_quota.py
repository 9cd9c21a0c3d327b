"""`raybig queue quota`: quotas set and read from the command line (issue 18, item 4), without a cluster."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from raybig.errors import UsageError
from raybig.scheduler import service
from raybig.scheduler.quota import parse_caps

pytestmark = pytest.mark.unit


def test_caps_parse_with_units():
    assert parse_caps(["CPU=16", "GPU=0.5", "memory=2GiB", "accel=3"]) == {
        "CPU": 16.0, "GPU": 0.5, "memory": 2.0 * 2**30, "accel": 3.0}


@pytest.mark.parametrize("bad", ["CPU", "CPU=", "=4", "CPU=abc", "CPU=-1", "CPU=inf", "memory=4XB"])
def test_malformed_caps_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_caps([bad])


def test_malformed_quota_is_one_line_exit_2_before_any_cluster(tmp_path):
    env = {**os.environ, "RAYBIG_HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "raybig", "queue", "quota", "alice", "CPU=lots"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.returncode == 2 and len(lines) == 1 and "'lots' is not an amount" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_stored_quotas_override_the_environment_per_user(monkeypatch):
    monkeypatch.setenv("RAYBIG_QUOTAS", '{"alice": {"CPU": 4}, "bob": {"CPU": 2}}')
    monkeypatch.setattr(service, "stored_quotas", lambda: {"alice": {"CPU": 16, "GPU": 1}, "bob": None,
                                                           "carol": {"GPU": 2}})
    assert service.cluster_quotas() == {"alice": {"CPU": 16, "GPU": 1}, "carol": {"GPU": 2}}


def test_the_board_carries_quotas_and_admitted_usage():
    from raybig.scheduler.meta import Phase
    from raybig.scheduler.policy import Demand

    core = service.SchedulerCore(lambda: {}, lambda ids: {}, lambda: [], quotas=lambda: {"u": {"CPU": 8}},
                                 log=lambda line: None)
    core._recovering = False
    core.heartbeat("a", Phase.RUNNING, {"priority": 0, "submitted_at": 0, "user": "u",
                                        "demand": Demand.of(2, {"CPU": 1.0}, {"CPU": 0.5}).to_json()})
    core.tick()
    b = core.board()
    assert b["quotas"] == {"u": {"CPU": 8}} and b["usage"] == {"u": {"CPU": 2.5}}
