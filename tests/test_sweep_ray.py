"""Sweeps on a real local Ray with real DeepSpeed: every trial is a 2-worker ZeRO-2 Train run.

Tiny trials (gpt-debug, seq_len 32, 8 steps, workers at 0.5 CPU) keep the file at a few minutes.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from raybig.spec import load_spec, load_spec_text
from raybig.tune import run_sweep

pytestmark = pytest.mark.ray
ROOT = pathlib.Path(__file__).resolve().parent.parent

BASE = """\
  seed: 3
  model: {preset: gpt-debug}
  data: {seq_len: 32, max_tokens: 200000}
  train: {steps: 8, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 1, eval_every: 4, eval_batches: 2, log_every: 2}
  deepspeed: {zero_stage: 2}
  resources: {workers: 2, cpus_per_worker: 0.5}
  checkpoint: {every: 4, keep: 1, max_failures: 0}
  sample: {max_new_tokens: 0}
"""


def sweep_text(storage: str, name: str, body: str) -> str:
    return f"kind: sweep\nname: {name}\nstorage: {{path: {storage}}}\nbase:\n{BASE}{body}"


def by_lr(report: dict) -> dict[float, dict]:
    return {r["params"]["train.lr"]: r for r in report["trials"]}


def test_grid_picks_good_lr_and_winner_trains(ray_local, storage_dir):
    from raybig.train.runner import run_train

    spec = load_spec_text(sweep_text(storage_dir, "grid", """\
search:
  train.lr: {grid: [3.0, 3.0e-3]}
algorithm: grid
scheduler: none
max_concurrent_trials: 2
"""))
    rep = run_sweep(spec)
    trials = by_lr(rep)
    assert {r["state"] for r in trials.values()} == {"finished"}
    assert trials[3.0e-3]["metric"] < trials[3.0]["metric"]
    best = rep["best"]
    assert best["params"] == {"train.lr": 3.0e-3}
    assert best["checkpoint"] and os.path.isdir(best["checkpoint"])
    sweep_dir = pathlib.Path(rep["sweep_dir"])
    assert (sweep_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((sweep_dir / "trials.json").read_text())) == 2
    assert "| finished |" in (sweep_dir / "trials.md").read_text()

    # best.yaml is a complete train spec: it validates through the CLI and trains further.
    ok = subprocess.run([sys.executable, "-m", "raybig", "validate", best["spec"]], capture_output=True,
                        text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    win = load_spec(best["spec"], [f"train.steps={4}", "checkpoint.every=4", "train.warmup_steps=1"])
    assert win.kind == "train" and win.train.lr == 3.0e-3 and win.init_from == best["export"]
    res = run_train(win)
    vals = [h["val_loss"] for h in res.history if "val_loss" in h]
    # Starts from the winner's weights: its first evaluation is already at the winner's level.
    assert vals[0] < trials[3.0e-3]["metric"] + 0.05, (vals, trials[3.0e-3]["metric"])
    assert res.metrics["step"] == 4


def test_asha_stops_bad_trials_early_and_frees_workers(ray_local, storage_dir):
    spec = load_spec_text(sweep_text(storage_dir, "asha", """\
search:
  train.lr: {grid: [3.0e-3, 5.0, 2.0e-3, 3.0]}
algorithm: grid
scheduler: asha
grace_period: 4
reduction_factor: 2
max_concurrent_trials: 1
"""))
    rep = run_sweep(spec)
    trials = by_lr(rep)
    seen = {lr: (r["state"], r["steps"], r["error"]) for lr, r in trials.items()}
    stopped = [r for r in trials.values() if r["state"] == "stopped early"]
    assert stopped, seen
    assert all(r["steps"] < 8 for r in stopped)
    # Trials after a stopped one got its workers and ran: nothing hung waiting for a placement group.
    assert all(r["state"] in ("finished", "stopped early") for r in trials.values()), seen
    assert trials[3.0e-3]["state"] == "finished"
    assert rep["best"]["params"]["train.lr"] in (3.0e-3, 2.0e-3)
    assert rep["total_steps"] < 4 * 8
    # ...and nothing holds them now: every trial's worker placement group is gone.
    assert _live_worker_groups(timeout_s=60) == [], "a trial's workers were not given back"

    # The report is reproducible on demand from the files alone.
    cli = subprocess.run([sys.executable, "-m", "raybig", "sweep", "report", rep["sweep_dir"], "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    again = json.loads(cli.stdout)
    assert [r["state"] for r in again["trials"]] == [r["state"] for r in rep["trials"]]


def _live_worker_groups(timeout_s: float) -> list:
    """Placement groups of Train worker gangs (0.5-CPU bundles here) that are still held."""
    from ray.util import placement_group_table

    deadline = time.time() + timeout_s
    while True:
        live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"
                and any(b.get("CPU") == 0.5 for b in pg["bundles"].values())]
        if not live or time.time() > deadline:
            return live
        time.sleep(1)


def _status(sweep_dir: pathlib.Path) -> dict:
    try:
        return json.loads((sweep_dir / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _starts(sweep_dir: pathlib.Path) -> dict[str, int]:
    out = {}
    for p in (sweep_dir / "trials").glob("*/trial.json"):
        out[p.parent.name] = json.loads(p.read_text())["starts"]
    return out


def test_failed_trial_and_interrupted_sweep_resumes(ray_local, storage_dir, tmp_path):
    """A crashing trial is marked failed while the others finish; Ctrl-C mid-sweep, then run again:
    finished and failed trials are not run again, the interrupted one resumes from its checkpoint."""
    text = sweep_text(storage_dir, "resume", """\
search:
  data.path: {grid: ["stdlib://", "/nonexistent/corpus/*.txt"]}
  train.lr: {grid: [3.0e-3, 2.0e-3]}
algorithm: grid
scheduler: none
max_concurrent_trials: 1
""").replace("steps: 8,", "steps: 16,")
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    sweep_dir = pathlib.Path(storage_dir) / "resume"
    env = {**os.environ, "RAY_ADDRESS": ray_local["address"]}  # attach to the session's Ray
    cmd = [sys.executable, "-m", "raybig", "run", str(path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    # Interrupt once at least one trial is done and another one is mid-training (past a checkpoint).
    deadline = time.time() + 600
    interrupted = None
    while time.time() < deadline and proc.poll() is None:
        st = _status(sweep_dir)
        done = [n for n, s in st.items() if s["state"] in ("terminated", "error")]
        running = [n for n, s in st.items() if s["state"] == "running"]
        if done and running:
            curve = sweep_dir / "trials" / running[0] / "curve.jsonl"
            if curve.exists() and any(json.loads(x).get("checkpoint_path") for x in curve.read_text().splitlines()):
                interrupted = running[0]
                break
        time.sleep(0.5)
    assert interrupted, (proc.poll(), _status(sweep_dir))
    before = {n: s["state"] for n, s in _status(sweep_dir).items()}
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 or "interrupted" in out.lower(), out[-2000:]

    again = subprocess.run(cmd + ["--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rep = json.loads(again.stdout)
    states = {r["trial"]: r["state"] for r in rep["trials"]}
    assert sorted(states.values()) == ["failed", "failed", "finished", "finished"], states
    for r in rep["trials"]:
        if r["state"] == "failed":
            assert "nonexistent" in r["params"]["data.path"] and "matched no files" in (r["error"] or "")
    starts = _starts(sweep_dir)
    for name, state in before.items():  # finished and failed before the interrupt: never started again
        if state in ("terminated", "error"):
            assert starts[name] == 1, (name, starts)
    assert starts[interrupted] == 2, starts
    # It resumed from its Train checkpoint: its step-0 evaluation was reported once, not again.
    raw = [json.loads(x)["step"] for x in (sweep_dir / "trials" / interrupted / "curve.jsonl").read_text().splitlines()]
    assert raw.count(0) <= 1 and raw[-1] == 16, raw
    assert rep["best"]["params"]["data.path"] == "stdlib://"
