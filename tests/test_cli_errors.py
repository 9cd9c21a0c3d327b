"""Expected failures through the real CLI: one `error ...` line, the documented exit code, no traceback.

Exit codes (README): 1 the job failed, 2 a spec or usage error (nothing started), 3 the cluster could
not be reached. The two cases that need Ray start an embedded one in their own `raybig run`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

TRAIN = """kind: train
name: {name}
model: {model}
data: {{path: "stdlib://", seq_len: 32, max_tokens: 20000}}
train: {{steps: 2, micro_batch_size: 2, eval_every: 2, eval_batches: 1, log_every: 1}}
deepspeed: {{zero_stage: 0}}
resources: {{workers: 1, cpus_per_worker: 1}}
storage: {{path: {storage}}}
checkpoint: {{every: 2, max_failures: 0}}
sample: {{max_new_tokens: 0}}
"""

BOOM = """def build(**kwargs):
    raise RuntimeError("boom: this plug-in model refuses to build")
"""


def raybig(*args: str, cwd: pathlib.Path, env: dict[str, str] | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, "RAYBIG_HOME": str(cwd / "home"), **(env or {})}
    e.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "raybig", *args], capture_output=True, text=True, env=e,
                          cwd=str(cwd), timeout=timeout)


def one_error(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The single `error ...` line of a failed command, after checking its exit code and words."""
    err = r.stderr
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert r.returncode == code, (r.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert all(w in lines[0] for w in words), lines
    return lines[0]


@pytest.mark.unit
def test_unreachable_address_is_exit_3(tmp_path):
    from raybig.cluster.ray_env import free_port

    r = raybig("status", "--address", f"http://127.0.0.1:{free_port()}", cwd=tmp_path, timeout=120)
    one_error(r, 3, "cannot reach")


@pytest.mark.unit
def test_no_address_anywhere_is_exit_3(tmp_path):
    r = raybig("list", cwd=tmp_path, timeout=120)
    one_error(r, 3, "no cluster address")


@pytest.mark.unit
def test_missing_checkpoint_is_exit_2_before_ray_starts(tmp_path):
    spec = tmp_path / "t.yaml"
    spec.write_text(TRAIN.format(name="resume", model="{preset: gpt-debug}", storage=tmp_path / "runs"))
    r = raybig("run", str(spec), "--resume-from", str(tmp_path / "nonexistent"), cwd=tmp_path, timeout=120)
    one_error(r, 2, "no such checkpoint", "nonexistent")
    assert not (tmp_path / "runs" / "resume").exists()  # nothing was started


@pytest.mark.ray
def test_failing_training_job_is_exit_1(tmp_path):
    """A plug-in model whose factory raises: the worker fails, restarts are spent (max_failures 0)."""
    (tmp_path / "boom_model.py").write_text(BOOM)
    spec = tmp_path / "t.yaml"
    spec.write_text(TRAIN.format(name="boom", model="{target: 'boom_model:build'}", storage=tmp_path / "runs"))
    r = raybig("run", str(spec), cwd=tmp_path)
    line = one_error(r, 1, "training failed", "boom: this plug-in model refuses to build")
    assert "max_failures=0" in line


@pytest.mark.ray
def test_edited_sweep_rerun_under_same_name_is_exit_2(tmp_path):
    """The sweep directory already holds another sweep's record (its hash differs): refused, exit 2."""
    base = tmp_path / "base.yaml"
    base.write_text(TRAIN.format(name="base", model="{preset: gpt-debug}", storage=tmp_path / "runs"))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"kind: sweep\nname: sw\nbase: base.yaml\nnum_samples: 1\nscheduler: none\n"
                     f"search: {{train.lr: {{choice: [0.001, 0.002]}}}}\nstorage: {{path: {tmp_path / 'runs'}}}\n")
    sweep_dir = tmp_path / "runs" / "sw"
    sweep_dir.mkdir(parents=True)
    # What an earlier run of a different spec under the same name left behind.
    (sweep_dir / "sweep.json").write_text(json.dumps({"name": "sw", "kind": "sweep", "spec_hash": "0123456789ab"}))
    r = raybig("run", str(sweep), cwd=tmp_path)
    one_error(r, 2, "run with another spec", "new name", "nothing was started")


# --- `--verbose`: the traceback on request, one line otherwise (issue 19) ---------------------------

BOOM_VALIDATE = """import sys
import raybig.spec.summary as s
def boom(spec):
    raise RuntimeError("boom: an unexpected bug")
s.validate_summary = boom
from raybig.cli import main
sys.argv = ["raybig", *sys.argv[1:]]
main()
"""


@pytest.mark.unit
@pytest.mark.parametrize("verbose", [False, True])
def test_expected_failure_is_one_line_and_verbose_adds_the_traceback(tmp_path, verbose):
    r = raybig(*(["--verbose"] if verbose else []), "report", str(tmp_path / "nothing"), cwd=tmp_path,
               timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.returncode == 2 and len(lines) == 1 and "no metrics.jsonl" in lines[0], r.stderr[-3000:]
    if verbose:
        assert "Traceback (most recent call last)" in r.stderr and "ReportError" in r.stderr
    else:
        assert r.stderr.strip().splitlines() == lines, r.stderr  # nothing but the one line


@pytest.mark.unit
@pytest.mark.parametrize("verbose", [False, True])
def test_unexpected_failure_is_one_line_and_verbose_adds_the_traceback(tmp_path, verbose):
    """A bug (not a RaybigError) is still one `error internal error: ...` line, exit 1."""
    spec = tmp_path / "t.yaml"
    spec.write_text(TRAIN.format(name="boom", model="{preset: gpt-debug}", storage=tmp_path / "runs"))
    script = tmp_path / "cli_with_a_bug.py"
    script.write_text(BOOM_VALIDATE)
    e = {**os.environ, "RAYBIG_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, str(script), *(["--verbose"] if verbose else []), "validate", str(spec)],
                       capture_output=True, text=True, env=e, cwd=str(tmp_path), timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error internal error: RuntimeError: boom: an unexpected bug"), lines
    if verbose:
        assert "Traceback (most recent call last)" in r.stderr and 'raise RuntimeError("boom' in r.stderr
    else:
        assert "Traceback" not in r.stderr and "--verbose" in lines[0]
