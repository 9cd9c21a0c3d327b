"""`raybig submit` on a multi-node cluster: a local storage.path must be shared (issue 18, item 4).

The check job's verdicts without a cluster; the job itself runs on the multi-node cluster tests
(`tests/test_submit_multinode.py`, where the nodes share this machine's disk, so it passes there).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from raybig.errors import UsageError
from raybig.scheduler import storage_check as sc

pytestmark = pytest.mark.unit


def _spec(path: str):
    return SimpleNamespace(storage=SimpleNamespace(path=path))


def _log(nodes: dict[str, str], wrote: bool = True) -> str:
    return "noise\n" + sc.RESULT_PREFIX + json.dumps({"wrote": wrote, "nodes": nodes, "write_error": "EACCES"})


def test_a_node_that_cannot_read_the_marker_refuses_the_submit(monkeypatch):
    found = sc.SharedCheck.from_logs(_log({"10.0.0.2 (ab12)": "ok", "10.0.0.3 (cd34)": "no such file there"}),
                                     "/home/me/runs")
    monkeypatch.setattr(sc, "check_shared", lambda path, address: found)
    with pytest.raises(UsageError) as e:
        sc.require_shared(_spec("/home/me/runs"), None, 3)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "storage.path '/home/me/runs' is not shared by every node" in msg
    assert "1 of 2 other node(s)" in msg and "10.0.0.3 (cd34): no such file there" in msg and "s3://" in msg


def test_shared_single_node_remote_or_unknown_pass(monkeypatch):
    calls: list[str] = []
    ok = sc.SharedCheck.from_logs(_log({"n1": "ok", "n2": "the read did not run: GetTimeoutError"}), "/nfs/runs")
    monkeypatch.setattr(sc, "check_shared", lambda path, address: calls.append(path) or ok)
    sc.require_shared(_spec("/nfs/runs"), None, 3)                 # every node that looked read it
    sc.require_shared(_spec("/home/me/runs"), None, 1)             # one node: nothing to share
    sc.require_shared(_spec("s3://bucket/runs"), None, 5)          # object stores are shared
    sc.require_shared(SimpleNamespace(), None, 5)                  # kinds without storage
    assert calls == ["/nfs/runs"]
    warned: list[str] = []
    monkeypatch.setattr(sc, "check_shared", lambda path, address: None)
    sc.require_shared(_spec("/home/me/runs"), None, 2, warn=warned.append)
    assert warned and "could not check" in warned[0]


def test_a_head_that_cannot_write_refuses():
    found = sc.SharedCheck.from_logs(_log({}, wrote=False), "/ro/runs")
    assert "the cluster's head cannot write there (EACCES)" in found.problem()


def test_the_marker_read(tmp_path):
    m = tmp_path / "marker"
    m.write_text("tok")
    assert sc._read(str(m), "tok") == "ok"
    assert sc._read(str(m), "other") == "the marker holds other content"
    assert sc._read(str(tmp_path / "none"), "tok") == "no such file there"
