"""Ctrl-C while `raybig run` waits for a gang that never comes: one line, exit 130, promptly, nothing left.

The gang asks for a GPU this machine does not have, with the can-never-fit check off (as on an
autoscaling cluster), so Ray Train waits for it forever and its own SIGINT handler blocks on an abort
the controller never answers: the case `raybig.cli.interrupt` exists for. The command runs as a user
would run it, in its own process group, and Ctrl-C goes to that whole group, as a terminal sends it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from raybig.cli.interrupt import descendants

SPEC = """kind: train
name: gpu-wait
model: {preset: gpt-debug}
data: {path: "stdlib://", seq_len: 32, max_tokens: 20000}
train: {steps: 2, micro_batch_size: 2, eval_every: 2, eval_batches: 1, log_every: 1}
deepspeed: {zero_stage: 0}
resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 1}
storage: {path: runs}
checkpoint: {every: 2, max_failures: 0}
sample: {max_new_tokens: 0}
"""


def _names(pids: list[int]) -> list[str]:
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/comm") as f:
                out.append(f.read().strip())
        except OSError:
            pass
    return out


def _alive(pids: list[int]) -> list[int]:
    left = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                st = f.read()
        except OSError:
            continue
        if st[st.rfind(b")") + 2:][:1] != b"Z":
            left.append(p)
    return left


@pytest.mark.ray
def test_ctrl_c_while_waiting_for_a_gang_exits_130_promptly(tmp_path):
    (tmp_path / "job.yaml").write_text(SPEC)
    env = {**os.environ, "RAYBIG_HOME": str(tmp_path / "home"), "RAYBIG_NO_FIT_CHECK": "1",
           "DS_ACCELERATOR": "cpu", "RAYBIG_INTERRUPT_GRACE_S": "4"}
    env.pop("RAY_ADDRESS", None)
    err = open(tmp_path / "stderr.txt", "w+")  # noqa: SIM115 - read after the process ends
    p = subprocess.Popen([sys.executable, "-m", "raybig", "run", "job.yaml"], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and "raylet" not in _names(descendants(p.pid)):
            assert p.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(6)  # Train's controller is up and waits for the GPU bundle
        assert p.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        started = descendants(p.pid)
        assert "raylet" in _names(started)
        t0 = time.time()
        os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
        code = p.wait(timeout=60)
        secs = time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = (tmp_path / "stderr.txt").read_text()
    print(f"exit {code} {secs:.1f} s after Ctrl-C; {len(started)} processes it had started")
    assert code == 130, text[-3000:]
    assert secs < 15, f"took {secs:.0f} s after Ctrl-C"
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.startswith(("interrupted", "error"))]
    assert len(lines) == 1 and lines[0].startswith("interrupted"), text[-3000:]
    time.sleep(2)
    left = _alive(started)
    assert not left, f"still running after exit: {list(zip(left, _names(left), strict=False))}"
