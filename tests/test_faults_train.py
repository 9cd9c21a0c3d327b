"""Faults in a train run: a crash mid-checkpoint, and how a spent run reports its failure.

A crash while a checkpoint is being written never leaves raybig resuming from a partial one.

The crash is injected, not timed: a `sitecustomize` put on the job's PYTHONPATH wraps
`pyarrow.fs.copy_files` (what Ray Train uploads checkpoints with) in every process of the run. When
rank 1 starts uploading the checkpoint of step CRASH, it copies its manifest and half of its
largest file, then SIGKILLs the whole `raybig run` (driver, Ray, workers) and itself: power loss in
the middle of publishing a checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from raybig.train.checkpoints import (
    SNAPSHOT,
    IncompleteCheckpointError,
    latest_checkpoint,
    newest_complete_checkpoint,
    recover_snapshot,
    require_complete,
    verify,
    write_manifest,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRASH = 10  # the step whose checkpoint upload is cut short (checkpoints every 5 steps)

SITECUSTOMIZE = textwrap.dedent('''
    import os
    if os.environ.get("RAYBIG_CRASH_AT_STEP"):
        import json, signal, time
        import pyarrow.fs as pafs

        _orig = pafs.copy_files
        _tag = "step_%08d" % int(os.environ["RAYBIG_CRASH_AT_STEP"])

        def _registered(run_dir):
            try:
                with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
                    return json.load(f).get("latest_checkpoint_result") is not None
            except (OSError, ValueError):
                return False

        def _crash(source, destination):
            # First let Ray register an earlier checkpoint, so there is one to resume from.
            deadline = time.time() + 60
            while not _registered(os.path.dirname(destination)) and time.time() < deadline:
                time.sleep(0.1)
            os.makedirs(destination, exist_ok=True)
            files = sorted((os.path.getsize(os.path.join(r, n)), os.path.relpath(os.path.join(r, n), source))
                           for r, _, names in os.walk(source) for n in names)
            for _, rel in files:
                if rel.startswith("raybig-manifest-"):
                    with open(os.path.join(source, rel), "rb") as s, open(os.path.join(destination, rel), "wb") as d:
                        d.write(s.read())
            size, rel = files[-1]
            os.makedirs(os.path.dirname(os.path.join(destination, rel)), exist_ok=True)
            with open(os.path.join(source, rel), "rb") as s, open(os.path.join(destination, rel), "wb") as d:
                d.write(s.read(size // 2))
            os.killpg(int(os.environ["RAYBIG_CRASH_PGID"]), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

        def copy_files(source, destination, *args, **kwargs):
            if (os.environ.get("RANK") == "1" and isinstance(source, str) and isinstance(destination, str)
                    and os.path.isdir(os.path.join(source, _tag))
                    and os.path.basename(destination).startswith("checkpoint_")):
                _crash(source, destination)
            return _orig(source, destination, *args, **kwargs)

        pafs.copy_files = copy_files
''')


def _step_of(ckpt: str) -> int:
    return int(pathlib.Path(ckpt, "latest").read_text().strip().rsplit("_", 1)[1])


@pytest.mark.unit
def test_verify_tells_complete_from_partial(tmp_path):
    """Manifests catch a missing rank, a missing file and a truncated file, in any copy order."""
    ranks = []
    for r in range(2):
        d = tmp_path / f"rank{r}"
        (d / "step_00000005").mkdir(parents=True)
        (d / "step_00000005" / f"shard_{r}.pt").write_bytes(os.urandom(1000 + r))
        if r == 0:
            (d / "latest").write_text("step_00000005")
        write_manifest(str(d), r, 2, 5)
        ranks.append(d)
    merged = tmp_path / "merged"
    for d in ranks:
        shutil.copytree(d, merged, dirs_exist_ok=True)
    check = verify(str(merged))
    assert check.complete and check.step == 5 and check.world_size == 2, check
    require_complete(str(merged))

    shard = merged / "step_00000005" / "shard_1.pt"
    shard.write_bytes(shard.read_bytes()[:500])  # cut short mid-file
    check = verify(str(merged))
    assert not check.complete and "500 of 1001 bytes" in check.problems[0], check
    with pytest.raises(IncompleteCheckpointError, match="incomplete"):
        require_complete(str(merged))
    shard.unlink()
    assert "missing" in verify(str(merged)).problems[0]
    (merged / "raybig-manifest-rank1.json").unlink()  # rank 1 never got as far as its manifest
    assert verify(str(merged)).problems == ["rank 1's manifest is missing"]


def _fake_checkpoint(folder: pathlib.Path, step: int, complete: bool = True) -> None:
    for r in range(2):
        d = folder.parent / f".{folder.name}-rank{r}"
        (d / f"step_{step:08d}").mkdir(parents=True)
        (d / f"step_{step:08d}" / f"shard_{r}.pt").write_bytes(b"x" * 100)
        write_manifest(str(d), r, 2, step)
        if complete or r == 0:
            shutil.copytree(d, folder, dirs_exist_ok=True)


@pytest.mark.unit
def test_unreadable_snapshot_is_moved_aside_for_the_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoint_a", 5)
    _fake_checkpoint(run / "checkpoint_b", 10)
    _fake_checkpoint(run / "checkpoint_c", 15, complete=False)  # the upload a crash cut short
    assert newest_complete_checkpoint(str(run)) == str(run / "checkpoint_b")
    snap = run / SNAPSHOT
    snap.write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_b"}]}))
    assert recover_snapshot(str(run)) is None and snap.exists()  # a sound snapshot is left alone
    snap.write_text('{"ray_version": "2.60.0", "checkpoint_res')  # Ray's in-place rewrite, cut short
    assert recover_snapshot(str(run)) == str(run / "checkpoint_b")
    assert not snap.exists() and (run / f"{SNAPSHOT}.unreadable").exists()


@pytest.mark.unit
def test_failure_after_restarts_names_the_cause():
    """Ray's WorkerGroupError starts with 'Training failed due to worker errors:' (all a one-line
    status would show); raybig's message says restarts are spent, and why, and where."""
    from raybig.spec import load_spec_text
    from raybig.train.runner import _explain_failure

    spec = load_spec_text((ROOT / "jobs/debug.yaml").read_text(), overrides=["checkpoint.max_failures=0"])
    ray_text = ("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nA worker health check failed.\n"
                "Worker info: Worker(\n  metadata=ActorMetadata(\n    hostname='vm',\n    node_ip='10.77.3.4',\n"
                "  ),\n)\nThe actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n"
                "The actor died because its node has died. Node Id: ce8c98d9\n")
    msg = _explain_failure(spec, RuntimeError(ray_text))
    assert "\n" not in msg and "checkpoint.max_failures=0" in msg, msg
    assert "The actor died because its node has died" in msg and "10.77.3.4" in msg, msg


@pytest.mark.ray
@pytest.mark.slow
def test_crash_while_writing_checkpoint_resumes_from_last_complete_one(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    runs = tmp_path / "runs"
    run_dir = runs / "debug"
    args = [sys.executable, "-m", "raybig", "run", str(ROOT / "jobs/debug.yaml"), "--json",
            "--set", f"storage.path={runs}", "--set", "sample.max_new_tokens=0", "--set", "checkpoint.every=5",
            "--set", "checkpoint.keep=3", "--set", "train.eval_every=100", "--set", "train.steps=20"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "RAYBIG_CRASH_AT_STEP": str(CRASH)}
    # `exec` keeps the shell's PID, which start_new_session made the process group id the hook kills.
    cmd = ["sh", "-c", 'RAYBIG_CRASH_PGID=$$ exec "$@"', "sh", *args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    family = _watch_family(proc, timeout=400)
    out, err = proc.communicate()
    t_crash = time.time() - t0
    _kill_leftovers(family)  # Ray processes outside the group, if any: this test started them
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err[-3000:])

    # The crash really was mid-write: the step-CRASH folder is on storage, and partial.
    folders = sorted(str(p) for p in run_dir.glob("checkpoint_*"))
    partial = [f for f in folders if (pathlib.Path(f) / f"step_{CRASH:08d}").exists()]
    assert len(partial) == 1 and not verify(partial[0]).complete, [verify(f) for f in folders]
    with pytest.raises(IncompleteCheckpointError):
        require_complete(partial[0])  # what `--resume-from <that folder>` would hit

    # What raybig resumes from is the newest checkpoint Ray registered: an earlier, complete one.
    latest = latest_checkpoint(str(run_dir))
    assert latest is not None and latest != partial[0]
    check = verify(latest)
    assert check.complete and check.world_size == 2 and check.step == _step_of(latest) < CRASH, check
    from raybig.train.export import load_state_dict

    sd = load_state_dict(latest)  # read back through every rank's ZeRO shard
    assert sd and all(bool(v.isfinite().all()) for v in sd.values())

    # Keep a copy of the crashed run for the second scenario below (its snapshot cut short).
    shutil.copytree(runs, tmp_path / "runs2")

    # A re-run of the same spec resumes from exactly that checkpoint and finishes.
    t1 = time.time()
    again = subprocess.run(args, capture_output=True, text=True, timeout=400)
    t_rerun = time.time() - t1
    assert again.returncode == 0, again.stderr[-3000:]
    hist = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    restored = [h["restored_step"] for h in hist if "restored_step" in h]
    assert restored == [check.step], (restored, check)
    assert hist[-1]["step"] == 20
    final = latest_checkpoint(str(run_dir))
    assert final and verify(final).complete and _step_of(final) == 20

    # Had the crash hit Ray's in-place rewrite of its checkpoint registry instead, the re-run
    # resumes from the newest complete folder (by manifests), never the partial one.
    runs2 = tmp_path / "runs2"
    snap = runs2 / "debug" / SNAPSHOT
    snap.write_text(snap.read_text()[:40])
    args2 = [a if a != f"storage.path={runs}" else f"storage.path={runs2}" for a in args]
    t2 = time.time()
    third = subprocess.run(args2, capture_output=True, text=True, timeout=400)
    t_rerun2 = time.time() - t2
    assert third.returncode == 0, third.stderr[-3000:]
    hist2 = [json.loads(line) for line in (runs2 / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert [h["restored_step"] for h in hist2 if "restored_step" in h] == [check.step]
    assert hist2[-1]["step"] == 20 and hist2[-1]["loss"] == pytest.approx(hist[-1]["loss"], rel=1e-5)
    print(f"\ncrash mid-checkpoint: killed at step {CRASH}'s upload {t_crash:.1f}s in; partial folder "
          f"refused ({verify(partial[0]).problems[0]}); resumed from step {check.step}; re-run {t_rerun:.1f}s; "
          f"with a cut-short registry too: re-run {t_rerun2:.1f}s, same final loss {hist2[-1]['loss']:.6f}")


def _watch_family(proc: subprocess.Popen, timeout: float) -> list:
    """Every process the run started, sampled until it exits (to clean up after a SIGKILL)."""
    import psutil

    seen: dict[int, psutil.Process] = {}
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            seen.update({c.pid: c for c in psutil.Process(proc.pid).children(recursive=True)})
        except psutil.Error:
            pass
        time.sleep(0.5)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run never reached the injected crash")
    return list(seen.values())


def _kill_leftovers(procs: list) -> None:
    import psutil

    alive = [p for p in procs if p.is_running()]  # is_running() also rules out a reused PID
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
