"""Preemption on a real cluster: a low-priority 2-worker training job yields to a high-priority one.

A `ray start --head` cluster with 3 logical CPUs (`raybig.cluster.local.LocalCluster`, as
tests/test_submit.py uses): one 2-worker job (2 x 1 CPU + 0.5 CPU driver) at a time. Jobs go the real
path: submit -> Ray Jobs API -> holder -> scheduler actor -> Ray Train + DeepSpeed. The network-
namespace multi-host fixture is not used here (it needs root and adds minutes on this 2-core box).
"""

from __future__ import annotations

import json
import pathlib
import time

import pytest
from scheduler_fakes import attached_local_cluster
from test_submit import ROOT, SNAPSHOT, cli, fast_submit, on_cluster, states, wait_done, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]

STEPS = 16


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    with attached_local_cluster(tmp_path_factory.mktemp("pcluster"),
                                {"RAYBIG_SCHED_TICK_S": "0.3", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
                                 "OMP_NUM_THREADS": "1"}) as c:
        yield c


def _metrics(c, job_id: str) -> list[dict]:
    from raybig.scheduler import client
    from raybig.scheduler.meta import METRICS_PREFIX

    out = []
    for line in client.logs(job_id, c.address).splitlines():
        i = line.find(METRICS_PREFIX)
        if i >= 0:
            out.append(json.loads(line[i + len(METRICS_PREFIX):]))
    return out


def _train(c, storage: pathlib.Path, name: str, priority: int) -> str:
    return fast_submit(c, str(ROOT / "jobs/debug.yaml"), f"name={name}", f"priority={priority}",
                       f"storage.path={storage}", "sample.max_new_tokens=0", f"train.steps={STEPS}",
                       "train.log_every=1", f"train.eval_every={STEPS}", "train.eval_batches=1",
                       f"checkpoint.every={STEPS}", "data.max_tokens=100000")


def test_high_priority_job_preempts_a_running_one_which_resumes_to_the_same_loss(cl, tmp_path):
    """low (priority 0) trains; hi (priority 5, same spec and seed) arrives on the full cluster. low
    checkpoints at its next step boundary and goes back to the queue (PREEMPTED, no retry spent); hi
    starts within a few ticks of that; low resumes from its checkpoint afterwards and ends with hi's
    final loss (hi is the undisturbed run of the same seed: the data order is keyed by step)."""
    low = _train(cl, tmp_path, "low", 0)
    # hi arrives as soon as low runs: its holder registers (seconds) while low's 2 workers start and
    # train (a 16-step run here is shorter than a loaded holder's start, so waiting for low's first
    # steps would race its end). low's loop sees the request at its next step boundary.
    wait_for(lambda: [s for s in states(cl, low) if s["state"] == "RUNNING"], 120, 0.3, "low RUNNING")
    t_submit = time.time()
    hi = _train(cl, tmp_path, "hi", 5)
    try:
        wait_for(lambda: [s for s in states(cl, low) if s["state"] == "PREEMPTED"], 90, 0.3, "low PREEMPTED")
    except AssertionError:
        from raybig.scheduler import client

        print("LOW", client.logs(low, cl.address)[-6000:], "\nHI", client.logs(hi, cl.address)[-3000:])
        print("SCHED", on_cluster(cl, SNAPSHOT))
        raise
    view = json.loads(cli(cl, "status", low, "--json").stdout)
    assert view["state"] in ("PREEMPTED", "RUNNING") and view["priority"] == 0, view  # RUNNING: hi already done
    # The loop finished the step in flight, checkpointed at that boundary and stopped.
    pre = next(m for m in _metrics(cl, low) if m.get("preempted_at_step"))
    assert 1 <= pre["preempted_at_step"] < STEPS and pre["step"] == pre["preempted_at_step"], pre
    hi_run = wait_for(lambda: [s for s in states(cl, hi) if s["state"] == "RUNNING"], 90, 0.3, "hi RUNNING")
    low_pre = next(s for s in states(cl, low) if s["state"] == "PREEMPTED")
    # hi is admitted within a few scheduler ticks (0.3 s) + heartbeats (0.5 s) of low yielding.
    assert hi_run[0]["t"] - low_pre["t"] < 5.0, (hi_run, low_pre)
    print(f"\nhi: submit -> RUNNING {hi_run[0]['t'] - t_submit:.1f} s; low yielded at step "
          f"{pre['preempted_at_step']} ({low_pre['t'] - t_submit:.1f} s after hi's submit)")
    assert wait_done(cl, hi, 240) == "SUCCEEDED"
    assert wait_done(cl, low, 240) == "SUCCEEDED"
    st = states(cl, low)
    runs = [s for s in st if s["state"] == "RUNNING" and "reason" not in s]
    assert len(runs) == 2 and [r["attempt"] for r in runs] == [1, 1], st  # a preemption spends no retry
    assert [s["reason"] for s in st if s["state"] == "RUNNING" and "reason" in s] == [f"preempted for {hi}: checkpointing"]
    assert not [s for s in st if s["state"] in ("RETRYING", "FAILED")], st
    hi_runs = [s for s in states(cl, hi) if s["state"] == "RUNNING"]
    assert len(hi_runs) == 1 and runs[1]["t"] > hi_runs[0]["t"]
    ml = _metrics(cl, low)
    # Resumed from the preemption's checkpoint: no step was lost.
    assert [m["restored_step"] for m in ml if "restored_step" in m] == [pre["preempted_at_step"]], ml
    from raybig.train.result import TrainResult

    r_low = TrainResult.from_run_dir(str(tmp_path / "low"))
    r_hi = TrainResult.from_run_dir(str(tmp_path / "hi"))
    assert r_low.steps == r_hi.steps == STEPS
    # Same seed, same batches per step, optimizer and LR schedule restored: the same final loss
    # (float64 CPU all-reduce over 2 ranks; the checkpoint holds fp32 master weights).
    assert r_low.metrics["loss"] == pytest.approx(r_hi.metrics["loss"], rel=1e-4, abs=1e-4), (r_low.metrics, r_hi.metrics)
    assert r_low.val_loss_last == pytest.approx(r_hi.val_loss_last, rel=1e-4, abs=1e-4)
    listed = json.loads(cli(cl, "list", "--all", "--json").stdout)
    assert any(v["job_id"] == low and v["state"] == "SUCCEEDED" for v in listed)
    pre_cli = cli(cl, "queue", "preemption", "--json")
    assert pre_cli.returncode == 0 and json.loads(pre_cli.stdout)["preemptions"] == 1, pre_cli.stdout + pre_cli.stderr
