"""Fail fast and say why, through the real CLI (issue 19, items 1-2).

Deterministic errors end before any worker starts (or, found inside a worker, without a worker-group
restart) in one `error` line with exit 2 (or 1), no traceback; relative paths resolve against the
directory the command runs in. The cases that need no Ray run `python -m raybig` as a user would;
the two that train share the session's embedded Ray through click's runner.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEBUG = ROOT / "jobs" / "debug.yaml"
ONE_WORKER = ["--set", "resources.workers=1", "--set", "train.steps=4", "--set", "checkpoint.every=4"]


def _cli(cwd: pathlib.Path, *args: str) -> tuple[int, str, float]:
    """`python -m raybig ARGS` in `cwd`: (exit code, stdout + stderr, seconds)."""
    t0 = time.time()
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "raybig", *args], cwd=cwd, capture_output=True, text=True,
                       env=env, timeout=120)
    return p.returncode, p.stdout + p.stderr, time.time() - t0


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "error " in ln or ln.startswith("error")]


def _spec_copy(folder: pathlib.Path) -> str:
    (folder / "job.yaml").write_text(DEBUG.read_text())
    return "job.yaml"


def _one_line_failure(code: int, out: str, secs: float, want: str, exit_code: int = 2) -> str:
    assert code == exit_code, out[-2000:]
    errors = _error_lines(out)
    assert len(errors) == 1, out[-2000:]
    assert want in errors[0], errors[0]
    assert "Traceback" not in out and "restart" not in out.replace("a restart cannot fix", "")
    assert secs < 30, f"took {secs:.0f} s"
    return errors[0]


@pytest.mark.unit
def test_glob_matching_nothing_fails_before_ray(tmp_path):
    """A relative glob that matches nothing: one line naming the absolute pattern, exit 2, no Ray."""
    spec = _spec_copy(tmp_path)
    code, out, secs = _cli(tmp_path, "run", spec, "--set", "data.path=corpus/*.txt", *ONE_WORKER)
    line = _one_line_failure(code, out, secs, "matched no files")
    assert str(tmp_path / "corpus" / "*.txt") in line


@pytest.mark.unit
def test_corpus_too_small_fails_before_ray(tmp_path):
    """12 bytes cannot fill one sequence once the validation share is held out: exit 2, before Ray."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "tiny.txt").write_text("hello world!")
    spec = _spec_copy(tmp_path)
    code, out, secs = _cli(tmp_path, "run", spec, "--set", "data.path=corpus/*.txt", *ONE_WORKER)
    _one_line_failure(code, out, secs, "too small for one training sequence")


@pytest.mark.unit
def test_checkpoint_from_two_workers_resumed_with_one(tmp_path):
    """A ZeRO checkpoint written by 2 ranks resumed at workers: 1 is converted before Ray starts; shards
    that are not torch files fail that conversion: one line, exit 1, the checkpoint untouched."""
    from raybig.train.checkpoints import write_manifest

    ckpt = tmp_path / "checkpoint_2026"
    for rank in (0, 1):
        shard = ckpt / "step4" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(b"x" * 64)
    for rank in (0, 1):  # each rank lists the whole folder: fine for the world-size check
        write_manifest(str(ckpt), rank, 2, 4)
    (ckpt / "latest").write_text("step4")
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    spec = _spec_copy(tmp_path)
    code, out, secs = _cli(tmp_path, "run", spec, "--resume-from", "checkpoint_2026", *ONE_WORKER)
    line = _one_line_failure(code, out, secs, "written by 2 workers", exit_code=1)
    assert "the checkpoint is unchanged" in line and str(ckpt) in line
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before


@pytest.mark.unit
def test_validate_runs_the_same_preflight_as_run(tmp_path):
    """`raybig validate` ends on the driver-side preflight with run's very line and exit code."""
    spec = _spec_copy(tmp_path)
    code, out, secs = _cli(tmp_path, "validate", spec, "--set", "data.path=corpus/*.txt", *ONE_WORKER)
    run_line = _one_line_failure(*_cli(tmp_path, "run", spec, "--set", "data.path=corpus/*.txt", *ONE_WORKER),
                                 "matched no files")
    assert _one_line_failure(code, out, secs, "matched no files") == run_line
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "tiny.txt").write_text("hello world!")
    code, out, secs = _cli(tmp_path, "validate", spec, "--set", "data.path=corpus/*.txt", *ONE_WORKER)
    _one_line_failure(code, out, secs, "too small for one training sequence")
    code, out, _ = _cli(tmp_path, "validate", spec, "--set", "data.path=corpus/*.txt", *ONE_WORKER, "--json")
    assert code == 2 and '"ok": false' in out and "too small" in out


@pytest.mark.unit
def test_validate_accepts_a_checkpoint_of_another_world_size(tmp_path):
    """The run's own latest checkpoint (auto-resume) or --resume-from, written by 2 ranks, workers: 1:
    `raybig run` converts it (raybig.train.universal), so validate does not refuse it."""
    from raybig.train.checkpoints import write_manifest

    run = tmp_path / "runs" / "debug"
    ckpt = run / "checkpoint_2026"
    for rank in (0, 1):
        shard = ckpt / "step4" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(b"x" * 64)
        write_manifest(str(ckpt), rank, 2, 4)
    spec = _spec_copy(tmp_path)
    code, out, secs = _cli(tmp_path, "validate", spec, "--resume-from", str(ckpt), *ONE_WORKER)
    assert code == 0 and "written by" not in out, out[-2000:]
    # Auto-resume: Ray's registry names the run's latest checkpoint.
    (run / "checkpoint_manager_snapshot.json").write_text(
        '{"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026"}}')
    code, out, secs = _cli(tmp_path, "validate", spec, "--set", "storage.path=runs", *ONE_WORKER)
    assert code == 0 and "written by" not in out, out[-2000:]


@pytest.fixture
def cli(ray_local):
    """Click's runner over the real `raybig` command, in this process (one embedded Ray)."""
    from raybig.cli import main

    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, str, float]:
        t0 = time.time()
        r = runner.invoke(main, list(args), catch_exceptions=False)
        return r.exit_code, r.output, time.time() - t0  # click 8.2: stdout and stderr as a user sees them

    return invoke


@pytest.mark.ray
def test_relative_data_path_trains_and_records_absolute_paths(cli, tmp_path, monkeypatch):
    """The issue's repro: `corpus/*.txt` relative to where the command runs trains on that file."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "part1.txt").write_text(DEBUG.read_text() * 800)  # ~300 KB of text
    monkeypatch.chdir(tmp_path)
    spec = _spec_copy(tmp_path)
    code, out, _ = cli("run", spec, "--set", "data.path=corpus/*.txt", "--set", "storage.path=./runs",
                       "--set", "sample.max_new_tokens=0", *ONE_WORKER)
    assert code == 0, out[-3000:]
    recorded = yaml.safe_load((tmp_path / "runs" / "debug" / "spec.yaml").read_text())
    assert recorded["data"]["path"] == str(tmp_path / "corpus" / "*.txt")
    assert recorded["storage"]["path"] == str(tmp_path / "runs")


@pytest.mark.ray
def test_deterministic_worker_error_is_not_retried(cli, tmp_path, monkeypatch):
    """Data found only inside a worker (shards prepared where the workers cannot see them: memory:// is
    the driver's own process) ends the run at the first worker-group failure, although
    checkpoint.max_failures allows 5 restarts."""
    monkeypatch.chdir(tmp_path)
    spec = _spec_copy(tmp_path)
    code, out, secs = cli("run", spec, "--set", "data.prepared_path=memory://prep", "--set",
                          f"storage.path={tmp_path / 'runs'}", "--set", "checkpoint.max_failures=5",
                          *ONE_WORKER)
    assert code == 1, out[-3000:]
    errors = _error_lines(out)
    assert len(errors) == 1, out[-3000:]
    assert "not retried" in errors[0] and "DataError: memory://prep/" in errors[0], errors[0]
    assert "not a complete prepared data set" in errors[0]
    assert "Traceback" not in out
    print(f"deterministic worker error: failed in {secs:.0f} s")
