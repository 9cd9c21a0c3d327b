"""`raybig.cluster.connect`: one address order, one token reader, one RAYBIG_HOME; and the upload size
check that follows Ray's own exclude rules (gitwildmatch, .gitignore/.rayignore)."""

from __future__ import annotations

import os

import pytest

from raybig.cluster import connect as C
from raybig.errors import EXIT_CLUSTER, ClusterError

pytestmark = pytest.mark.unit


@pytest.fixture
def home(tmp_path, monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAYBIG_HOME", str(tmp_path / "rb"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    return tmp_path


def test_every_saved_file_lives_under_raybig_home(home, monkeypatch):
    rb = home / "rb"
    assert C.raybig_home() == rb
    assert C.address_file().parent == rb and C.local_cluster_dir() == rb / "cluster"
    assert C.serve_state_file().parent == rb
    from raybig.cluster.local import default_dir

    assert default_dir() == rb / "cluster"
    monkeypatch.delenv("RAYBIG_HOME")
    assert C.raybig_home() == home / "user" / ".raybig"


def test_address_order_flag_then_env_then_saved_then_local_serve(home, monkeypatch):
    with pytest.raises(ClusterError, match="no cluster address") as e:
        C.resolve_address(None)
    assert e.value.exit_code == EXIT_CLUSTER
    C.save_serve_state("127.0.0.1:4444", "app")  # a live `raybig run serve.yaml` (this process)
    assert C.resolve_address(None) == "http://127.0.0.1:4444"
    C.save_address("http://127.0.0.1:3333/")
    assert C.resolve_address(None) == "http://127.0.0.1:3333"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:2222")
    assert C.resolve_address(None) == "http://127.0.0.1:2222"
    assert C.resolve_address("http://10.0.0.1:1111") == "http://10.0.0.1:1111"
    C.clear_serve_state()
    assert not C.serve_state_file().exists()


def test_dead_local_serve_is_ignored_and_non_dashboard_addresses_refused(home, monkeypatch):
    C.serve_state_file().parent.mkdir(parents=True)
    C.serve_state_file().write_text('{"dashboard": "http://127.0.0.1:1", "pid": 999999999, "app": "x"}')
    with pytest.raises(ClusterError, match="no cluster address"):
        C.resolve_address(None)
    for bad in ("auto", "ray://head:10001"):
        with pytest.raises(ClusterError, match="not a Jobs API URL"):
            C.resolve_address(bad)


def test_token_order_env_then_path_then_home_file(home, monkeypatch):
    assert C.read_token() is None and C.auth_headers() == {}
    (home / "user" / ".ray").mkdir(parents=True)
    (home / "user" / ".ray" / "auth_token").write_text("from-home\n")
    assert C.read_token() == "from-home"
    (home / "tok").write_text("  from-path \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / "tok"))
    assert C.read_token() == "from-path" and C.token_path() == home / "tok"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert C.auth_headers() == {"Authorization": "Bearer from-env"}
    from raybig.cluster.local import default_token_path

    assert default_token_path() == str(home / "tok")  # `cluster up` writes where clients read


def test_translate_is_one_line():
    e = C.translate(RuntimeError("Failed to connect to http://x\nlong\ntrace"), "http://x")
    assert "cannot reach" in str(e) and "\n" not in str(e)
    e = C.translate(ValueError("weird\nsecond line"), "http://x")
    assert str(e) == "http://x: ValueError: weird"


def test_upload_check_uses_gitwildmatch_and_ignore_files(tmp_path, monkeypatch):
    from raybig.scheduler.client import EXCLUDES, check_upload

    def put(rel: str, n: int) -> None:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * n)

    put("plugin.py", 10)
    put("pkg/runs/out.txt", 1000)          # `runs` excluded at any depth
    put("pkg/w.pt", 1000)                  # `*.pt`
    put("data/big.txt", 1000)              # excluded by .gitignore `/data/`
    put("pkg/data/keep.txt", 20)           # ... which is anchored to the root: kept
    put("pkg/sub/secret.log", 1000)        # excluded by pkg/.rayignore `*.log` below pkg/
    put("top.log", 30)                     # ... but not above it
    (tmp_path / ".gitignore").write_text("/data/\n")
    (tmp_path / "pkg" / ".rayignore").write_text("*.log\n")
    size = len("/data/\n") + len("*.log\n")
    assert check_upload(str(tmp_path), EXCLUDES) == 10 + 20 + 30 + size
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    assert check_upload(str(tmp_path), EXCLUDES) == 10 + 20 + 30 + size + 1000
    monkeypatch.setenv("RAYBIG_MAX_UPLOAD_BYTES", "50")
    with pytest.raises(ClusterError, match="over Ray's upload limit") as e:
        check_upload(str(tmp_path), EXCLUDES)
    assert "data/big.txt" in str(e.value)


def test_upload_check_agrees_with_ray_packaging(tmp_path):
    """Same files as Ray's own walk (`_dir_travel` with the same excludes and ignore files)."""
    from pathlib import Path

    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    from raybig.scheduler.client import EXCLUDES, check_upload

    for rel, n in [("a.py", 3), ("b/c.py", 5), ("b/x.npy", 7), ("venv/lib.py", 11), ("d/e/f.ckpt", 13),
                   ("d/e/g.txt", 17), (".git/HEAD", 19), ("d/runs", 23)]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * n)
    (tmp_path / ".gitignore").write_text("*.txt\n")
    total = 0

    def handler(p: Path) -> None:
        nonlocal total
        if p.is_file():
            total += p.stat().st_size

    _dir_travel(tmp_path, [_get_excludes(tmp_path, EXCLUDES)], handler, include_gitignore=True)
    assert check_upload(str(tmp_path), EXCLUDES) == total
    assert os.path.exists(tmp_path / "d" / "runs")
