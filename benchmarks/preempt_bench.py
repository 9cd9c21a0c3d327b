"""Preemption benchmark: a high-priority job's wait on a full cluster, with and without preemption.

A real local head (`raybig.cluster.local`, 3 logical CPUs: one 2-worker job at a time). Per scenario:
a low-priority 2-worker training job (`jobs/debug.yaml`, `--victim-steps` steps) runs; once it reports
step `--at`, a priority-5 job of the same shape is submitted. Measured: seconds from that submit to
the high job's first training step (its holder's RUNNING time + the run's `seconds_to_first_step`).

- off: `raybig queue preemption --off`: the high job waits for the victim to finish.
- on:  `raybig queue preemption --on`: the victim checkpoints at its next step boundary and yields.
  Steps lost = the step it stopped at minus the step it resumed from (its first record after the
  restore carries `restored_step`); the victim is stopped once it has resumed.

    .venv/bin/python benchmarks/preempt_bench.py [--victim-steps 400] [--at 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cli(c: Any, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": c.address}
    return subprocess.run([sys.executable, "-m", "raybig", *args], capture_output=True, text=True, env=env,
                          timeout=180, cwd=str(ROOT))


def _lines(c: Any, job: str, prefix: str) -> list[dict[str, Any]]:
    from raybig.scheduler import client

    out = []
    for line in client.logs(job, c.address).splitlines():
        i = line.find(prefix)
        if i >= 0:
            try:
                out.append(json.loads(line[i + len(prefix):]))
            except ValueError:
                pass
    return out


def _wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise TimeoutError(what)


def _submit(c: Any, storage: str, name: str, priority: int, steps: int) -> str:
    from raybig.scheduler import client
    from raybig.spec import load_spec

    spec = load_spec(str(ROOT / "jobs/debug.yaml"), [f"name={name}", f"priority={priority}", f"storage.path={storage}",
                                                     "sample.max_new_tokens=0", f"train.steps={steps}",
                                                     "train.log_every=1", f"train.eval_every={steps}",
                                                     "train.eval_batches=1", f"checkpoint.every={steps}",
                                                     "data.max_tokens=100000"])
    return client.submit(spec, str(ROOT), c.address)[0]


def scenario(c: Any, storage: str, tag: str, preempt: bool, victim_steps: int, at: int,
             hi_steps: int) -> dict[str, Any]:
    from raybig.scheduler.meta import METRICS_PREFIX, STATE_PREFIX

    r = _cli(c, "queue", "preemption", "--on" if preempt else "--off")
    assert r.returncode == 0, r.stderr[-2000:]
    low = _submit(c, storage, f"low-{tag}", 0, victim_steps)
    _wait(lambda: any(m.get("step", 0) >= at for m in _lines(c, low, METRICS_PREFIX)), 300, "victim progress")
    t0 = time.time()
    hi = _submit(c, storage, f"hi-{tag}", 5, hi_steps)
    done = _wait(lambda: [s for s in _lines(c, hi, STATE_PREFIX) if s["state"] in ("SUCCEEDED", "FAILED")], 600,
                 "high job done")
    assert done[0]["state"] == "SUCCEEDED", done
    hi_run = next(s for s in _lines(c, hi, STATE_PREFIX) if s["state"] == "RUNNING")
    first = hi_run["t"] + float(done[0]["result"]["seconds_to_first_step"]) - t0
    out: dict[str, Any] = {"preemption": preempt, "submit_to_running_s": round(hi_run["t"] - t0, 1),
                           "submit_to_first_step_s": round(first, 1)}
    if preempt:
        m = _wait(lambda: [x for x in _lines(c, low, METRICS_PREFIX) if "restored_step" in x], 300, "victim resumed")
        stopped = next(x for x in _lines(c, low, METRICS_PREFIX) if x.get("preempted_at_step"))
        out.update(victim_stopped_at=stopped["preempted_at_step"], victim_resumed_from=m[0]["restored_step"],
                   steps_lost=stopped["preempted_at_step"] - m[0]["restored_step"])
        pre = next(s for s in _lines(c, low, STATE_PREFIX) if s["state"] == "PREEMPTED")
        out["victim_yield_s"] = round(pre["t"] - t0, 1)
        out["yield_to_high_running_s"] = round(hi_run["t"] - pre["t"], 2)
    _cli(c, "stop", low)
    return out


def main() -> None:
    """Run both scenarios on one local head; print a markdown table (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--victim-steps", type=int, default=400)
    ap.add_argument("--hi-steps", type=int, default=8)
    ap.add_argument("--at", type=int, default=20, help="victim step at which the high job is submitted")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from raybig.cluster.local import LocalCluster

    with tempfile.TemporaryDirectory(prefix="raybig-preempt-bench-") as d:
        c = LocalCluster(dir=f"{d}/c", workers=0, head_cpus=3, env={"RAYBIG_SCHED_TICK_S": "0.5"})
        c.up()
        os.environ["RAY_AUTH_TOKEN_PATH"] = c.token_path
        os.environ["RAYBIG_HOME"] = f"{d}/home"
        try:
            rows = [scenario(c, f"{d}/st", "off", False, a.victim_steps, a.at, a.hi_steps),
                    scenario(c, f"{d}/st", "on", True, a.victim_steps, a.at, a.hi_steps)]
        finally:
            c.down()
    off, on = rows
    print("| high-priority job on a full cluster | submit -> RUNNING (s) | submit -> first training step (s) |")
    print("|---|---:|---:|")
    print(f"| without preemption (waits for the victim) | {off['submit_to_running_s']} | {off['submit_to_first_step_s']} |")
    print(f"| with preemption (victim checkpoints and yields) | {on['submit_to_running_s']} | {on['submit_to_first_step_s']} |")
    print(f"| ratio without / with | {off['submit_to_running_s'] / max(on['submit_to_running_s'], 1e-9):.2f}x | "
          f"{off['submit_to_first_step_s'] / max(on['submit_to_first_step_s'], 1e-9):.2f}x |")
    print(f"\nvictim stopped at step {on['victim_stopped_at']}, resumed from step {on['victim_resumed_from']}: "
          f"{on['steps_lost']} step(s) lost; yielded {on['victim_yield_s']} s after the submit; the high job "
          f"RUNNING {on['yield_to_high_running_s']} s after the yield")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
