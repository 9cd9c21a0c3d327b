"""Training on a real local Ray with real DeepSpeed: ZeRO stages, offload, resume, faults, plug-ins."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import subprocess
import sys
import threading

import pytest

from raybig.spec import load_spec_text
from raybig.train.runner import run_train

pytestmark = pytest.mark.ray
ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny(storage: str, name: str, **sets) -> object:
    text = f"""
kind: train
name: {name}
seed: 3
model: {{preset: gpt-debug}}
data: {{seq_len: 32, max_tokens: 300000}}
train: {{steps: 6, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 1, eval_every: 3, eval_batches: 2, log_every: 1}}
deepspeed: {{zero_stage: 2}}
resources: {{workers: 2, cpus_per_worker: 1}}
storage: {{path: {storage}}}
checkpoint: {{every: 3, keep: 2, max_failures: 2}}
sample: {{max_new_tokens: 0}}
"""
    return load_spec_text(text, overrides=[f"{k}={v}" for k, v in sets.items()])


def checkpoints(run_dir: str) -> dict[int, str]:
    """step -> checkpoint dir, from the DeepSpeed tag folders Ray Train merged from every rank."""
    out = {}
    for d in glob.glob(f"{run_dir}/checkpoint_*"):
        for tag in glob.glob(f"{d}/step_*"):
            out[int(tag.rsplit("_", 1)[1])] = d
    return out


def check_trained(res, stage: int, steps: int, every: int) -> None:
    assert res.metrics["step"] == steps
    vals = [h["val_loss"] for h in res.history if "val_loss" in h]
    assert vals[-1] < vals[0] - 0.2, vals  # it learned something
    ckpts = checkpoints(res.run_dir)
    assert sorted(ckpts) == [steps - every, steps]  # keep=2
    files = os.listdir(f"{ckpts[steps]}/step_{steps:08d}")
    if stage == 0:
        assert "mp_rank_00_model_states.pt" in files
    else:  # every rank's optimizer shard landed in the one merged checkpoint
        assert sum("optim_states" in f for f in files) == 2, files
    assert os.path.exists(f"{res.run_dir}/export/model.safetensors")
    assert os.path.exists(f"{res.run_dir}/spec.yaml")
    assert len(open(f"{res.run_dir}/metrics.jsonl").read().splitlines()) >= steps


# Stage 2 is the `undisturbed` reference run below (test_zero2_trains_and_checkpoints).
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_stage_trains_and_checkpoints(ray_local, storage_dir, stage):
    res = run_train(tiny(storage_dir, f"stage{stage}", **{"deepspeed.zero_stage": stage}))
    check_trained(res, stage, steps=6, every=3)


@pytest.mark.slow
def test_cpu_offload_trains(ray_local, storage_dir):
    # Builds DeepSpeed's cpu_adam with g++ the first time (about a minute; cached afterwards).
    spec = tiny(storage_dir, "offload", **{"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": "cpu",
                                           "deepspeed.offload_param": "cpu"})
    res = run_train(spec)
    vals = [h["val_loss"] for h in res.history if "val_loss" in h]
    assert res.metrics["step"] == 6 and vals[-1] < vals[0]


# One undisturbed ZeRO-2 run: the stage-2 check, the reference for both resume tests (same spec, same
# seed) and the base that init_from fine-tunes.
REF = {"train.steps": 30, "checkpoint.every": 10}


@pytest.fixture(scope="module")
def undisturbed(ray_local, tmp_path_factory):
    return run_train(tiny(str(tmp_path_factory.mktemp("ref") / "runs"), "full", **REF))


def test_zero2_trains_and_checkpoints(undisturbed):
    check_trained(undisturbed, 2, steps=30, every=10)


def test_resume_matches_uninterrupted_run(undisturbed, storage_dir):
    full = undisturbed
    mid = checkpoints(full.run_dir)[20]
    resumed = run_train(tiny(storage_dir, "resumed", **REF), resume_from=mid)
    assert resumed.history[0]["step"] == 21 and resumed.history[0]["restored_step"] == 20
    a = {h["step"]: h["loss"] for h in full.history if "loss" in h and h["step"] > 20}
    b = {h["step"]: h["loss"] for h in resumed.history if "loss" in h}
    assert a.keys() == b.keys()
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])


def test_killed_worker_is_replaced_and_resumes(undisturbed, ray_local, storage_dir):
    """SIGKILL a training worker mid-run: Ray Train replaces it, the run resumes from its latest
    registered checkpoint and ends exactly where an undisturbed run with the same seed ends."""
    from ray.util.state import list_actors

    from raybig.train.checkpoints import latest_checkpoint

    spec = tiny(storage_dir, "killed", **REF)
    run_dir = f"{storage_dir}/killed"
    killed: list[int] = []
    lock = threading.Lock()

    def on_metrics(m):
        with lock:
            # Kill only once the controller has registered a checkpoint: folders it has not
            # registered yet are not resumed from (the run would start over).
            if killed or m.get("step", 0) >= 25 or latest_checkpoint(run_dir) is None:
                return
            workers = list_actors(address=f"http://{ray_local['dashboard_url']}",
                                  filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            pid = workers[-1].pid
            os.kill(pid, 9)
            killed.append(pid)

    res = run_train(spec, on_metrics=on_metrics)
    assert killed, "the run finished before a worker could be killed"
    assert res.metrics["step"] == 30
    restored = [h["restored_step"] for h in res.history if "restored_step" in h]
    assert restored and restored[-1] in (10, 20), res.history
    # Same final loss as the undisturbed run: data order, RNG, optimizer and lr schedule all resumed.
    ref = undisturbed.metrics
    assert res.metrics["loss"] == pytest.approx(ref["loss"], rel=1e-4), (res.metrics["loss"], ref["loss"])
    assert res.metrics["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4)
    print(f"\nkilled worker: restored step {restored[-1]}, final loss {res.metrics['loss']!r} vs "
          f"undisturbed {ref['loss']!r} (val {res.metrics['val_loss']!r} vs {ref['val_loss']!r})")


def test_plugin_model_trains(ray_local, storage_dir):
    text = (ROOT / "jobs/plugin_lstm.yaml").read_text()
    sys.path.insert(0, str(ROOT / "jobs"))
    spec = load_spec_text(text, overrides=[f"storage.path={storage_dir}", "train.steps=10", "train.eval_every=5",
                                           "data.max_tokens=300000", "checkpoint.every=10"])
    res = run_train(spec, python_path=[str(ROOT / "jobs")])
    vals = [h["val_loss"] for h in res.history if "val_loss" in h]
    assert res.metrics["step"] == 10 and vals[-1] < vals[0]
    assert os.path.exists(f"{res.run_dir}/export/model.safetensors")


def test_init_from_finetunes_from_weights(undisturbed, storage_dir):
    base = undisturbed
    ft = run_train(tiny(storage_dir, "ft", **{"init_from": base.run_dir, "train.steps": 3}))
    start = ft.history[0]["val_loss"]
    assert start == pytest.approx(base.metrics["val_loss"], rel=0.02)  # starts where base ended
    assert "restored_step" not in ft.history[0]  # weights only: a fresh optimizer and step 0


def test_ctrl_c_stops_cleanly_and_rerun_resumes(tmp_path):
    """Through the CLI (its own embedded Ray): Ctrl-C mid-run exits 130 and leaves no process behind;
    a second run of the same spec picks up the last checkpoint."""
    import signal
    import time

    import psutil

    args = [sys.executable, "-m", "raybig", "run", str(ROOT / "jobs/debug.yaml"), "--json",
            "--set", f"storage.path={tmp_path}", "--set", "sample.max_new_tokens=0",
            "--set", "checkpoint.every=5"]
    proc = subprocess.Popen(args + ["--set", "train.steps=5000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # Two checkpoint folders: the first is then surely complete and registered.
    while len(checkpoints(str(tmp_path / "debug"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert len(checkpoints(str(tmp_path / "debug"))) >= 2, proc.communicate()[1][-2000:]
    family = psutil.Process(proc.pid).children(recursive=True)
    assert any("RayTrainWorker" in " ".join(c.cmdline()) for c in family if c.is_running())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline()[:3] for p in alive]  # no zombie workers, raylet or GCS

    # The newest folder may be an upload the interrupt cut short; Ray Train resumes from the newest
    # checkpoint it registered, which is one of the last two.
    saved = sorted(checkpoints(str(tmp_path / "debug")))
    last = saved[-1]
    second = subprocess.run(args + ["--set", f"train.steps={last + 3}"], capture_output=True, text=True,
                            timeout=400)
    assert second.returncode == 0, second.stderr[-2000:]
    hist = [json.loads(line) for line in open(tmp_path / "debug" / "metrics.jsonl")]
    restored = [h["restored_step"] for h in hist if "restored_step" in h]
    assert len(restored) == 1 and restored[0] in saved[-2:], (restored, saved)
    assert hist[-1]["step"] == last + 3


@pytest.mark.slow
def test_quickstart_reaches_target_loss(tmp_path):
    """The README's first command, end to end: val loss from ~5.5 to under 2.5 and a sample."""
    proc = subprocess.run([sys.executable, "-m", "raybig", "run", str(ROOT / "jobs/quickstart.yaml"), "--json",
                           "--set", f"storage.path={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["val_loss_first"] > 5.0 and out["val_loss_last"] < 2.5, out
    assert len(out["sample"]) > 50
