"""Scheduler and submission benchmark; prints markdown tables.

1. Latency on a real local head (`raybig.cluster.local`, token auth on): seconds from starting
   `raybig submit` to the job RUNNING and to its first training step, against Ray's own
   `ray job submit` of the same entrypoint (`python -m raybig.entrypoint` with the same frozen spec,
   but RAYBIG_SCHEDULER=off: no queue, no admission). Both clocks start when the CLI process starts,
   so both include CLI start-up. RUNNING = Ray's job status for plain, the admitted holder for raybig.
   First step = the first `[raybig] metrics` line with a training loss in the job's logs.
2. The pure policy (`policy.decide`, no Ray): ms per full scheduling pass over a generated queue,
   for each JOBSxNODES in --sizes; --before also times the pre-rewrite policy kept as the reference
   in tests/test_scheduler_policy.py (slow: 20-60 s a pass at 10,000 x 256).

    .venv/bin/python benchmarks/scheduler_submit.py [--reps 2] [--skip-cluster | --policy-only]
        [--sizes 500x16,2000x64,5000x128,10000x256] [--before] [--seconds 3]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_scenario(n_jobs: int = 500, n_nodes: int = 16):
    """The benchmark's queue: `n_jobs` jobs (the first 40 already admitted) on `n_nodes` equal nodes.

    Nodes: 32 CPU, 4 GPU, 256 GB each. Jobs: 1/2/4/8 workers of 2/4/8 CPU and 0/1 GPU, plus a 0.5-CPU
    driver; priorities 0-9; users u0-u4, u0 capped at 8 GPU. Seeded: every call returns the same queue.
    """
    from raybig.scheduler.policy import Demand, Job, Node

    rng = random.Random(0)
    nodes = [Node({"CPU": 32.0, "GPU": 4.0, "memory": 256e9}, {"CPU": 32.0, "GPU": 4.0, "memory": 256e9})
             for _ in range(n_nodes)]
    jobs = []
    for i in range(n_jobs):
        w = rng.choice([1, 2, 4, 8])
        per = {"CPU": float(rng.choice([2, 4, 8])), "GPU": float(rng.choice([0, 1]))}
        jobs.append(Job(f"j{i}", rng.randint(0, 9), float(i), Demand.of(w, per, {"CPU": 0.5}),
                        user=f"u{i % 5}", admitted=i < 40))
    return jobs, nodes, {"u0": {"GPU": 8.0}}


def decide_rate(n_jobs: int = 500, n_nodes: int = 16, seconds: float = 3.0, min_passes: int = 3,
                reference: bool = False) -> dict[str, float]:
    """Time full `decide` passes over `make_scenario(n_jobs, n_nodes)`.

    Only `decide` is timed (the fresh copy of the queue each pass needs is built outside the clock).
    Runs for `seconds` and at least `min_passes` passes (one pass if `reference` and a pass is slow).
    `reference=True` times the pre-rewrite policy kept in tests/test_scheduler_policy.py.
    """
    from raybig.scheduler.policy import Job, decide

    if reference:
        from tests.test_scheduler_policy import _reference_decide as decide  # noqa: F811
    jobs, nodes, quotas = make_scenario(n_jobs, n_nodes)
    times: list[float] = []
    cpu: list[float] = []
    admitted = 0
    while sum(times) < seconds or len(times) < min_passes:
        # decide() marks what it admits: every pass starts from the same 40 running + the rest queued.
        fresh = [Job(j.job_id, j.priority, j.submitted_at, j.demand, j.user, admitted=j.admitted)
                 for j in jobs]
        t0, c0 = time.perf_counter(), time.process_time()
        dec = decide(fresh, nodes, quotas)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        admitted = len(dec.admit)
        if reference and times[-1] > seconds:
            break
    waiting = sum(1 for j in jobs if not j.admitted)
    ms = 1000 * statistics.median(times)
    return {"passes": len(times), "ms_per_pass": ms, "ms_min": 1000 * min(times),
            "cpu_ms_per_pass": 1000 * statistics.median(cpu),
            "passes_per_s": 1000 / ms, "job_decisions_per_s": waiting * 1000 / ms, "admitted": admitted}


def policy_scaling(sizes: list[tuple[int, int]], seconds: float, before: bool) -> None:
    """Print the scaling table: ms per full pass, jobs x nodes, after (and before) the rewrite."""
    print("### Scheduler policy: one full pass (`policy.decide`); medians, wall-clock ms (CPU ms)\n")
    if before:
        print("| jobs x nodes | admitted | before: ms / pass (CPU ms) | after: ms / pass (CPU ms) "
              "| after: fastest pass, ms | speed-up |")
        print("|---|---:|---:|---:|---:|---:|")
    else:
        print("| jobs x nodes | admitted | ms / pass, median (min) | CPU ms / pass | job decisions / s |")
        print("|---|---:|---:|---:|---:|")
    for n_jobs, n_nodes in sizes:
        new = decide_rate(n_jobs, n_nodes, seconds)
        if before:
            old = decide_rate(n_jobs, n_nodes, seconds, min_passes=1, reference=True)
            assert old["admitted"] == new["admitted"]
            print(f"| {n_jobs:,} x {n_nodes} | {new['admitted']} | {old['ms_per_pass']:,.1f} "
                  f"({old['cpu_ms_per_pass']:,.1f}) | {new['ms_per_pass']:.1f} ({new['cpu_ms_per_pass']:.1f}) "
                  f"| {new['ms_min']:.1f} | {old['ms_per_pass'] / new['ms_per_pass']:,.0f}x |", flush=True)
        else:
            print(f"| {n_jobs:,} x {n_nodes} | {new['admitted']} | {new['ms_per_pass']:.1f} ({new['ms_min']:.1f}) "
                  f"| {new['cpu_ms_per_pass']:.1f} | {new['job_decisions_per_s']:,.0f} |", flush=True)
    print()


def _first(pred, timeout: float = 150, every: float = 0.1) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return time.time()
        time.sleep(every)
    raise TimeoutError("benchmark job did not get there in time")


def _has_step(logs: str) -> bool:
    return any("[raybig] metrics" in ln and '"loss"' in ln for ln in logs.splitlines())


def one_run(c, spec, spec_path: str, overrides: list[str], plain: bool) -> tuple[float, float]:
    from raybig.cluster.jobs import connect
    from raybig.scheduler.client import entrypoint
    from raybig.scheduler.meta import STATE_PREFIX
    from raybig.spec import freeze, spec_hash

    client, _ = connect(c.address)
    env = {**os.environ, "RAY_ADDRESS": c.address, "RAY_AUTH_MODE": "token"}
    t0 = time.time()
    if plain:
        job_id = f"plain-{int(t0 * 1000)}"
        renv = {"env_vars": {"RAYBIG_SPEC_B64": base64.b64encode(freeze(spec).encode()).decode(),
                             "RAYBIG_SPEC_HASH": spec_hash(spec), "RAYBIG_JOB_ID": job_id,
                             "RAYBIG_SCHEDULER": "off"}}
        subprocess.run([str(pathlib.Path(sys.executable).parent / "ray"), "job", "submit", "--no-wait",
                        "--submission-id", job_id, "--runtime-env-json", json.dumps(renv),
                        "--address", c.address, "--", "sh", "-c", entrypoint(None)],
                       check=True, capture_output=True, env=env)
        running = _first(lambda: str(client.get_job_status(job_id).value) == "RUNNING")
    else:
        sets = [a for o in overrides for a in ("--set", o)]
        r = subprocess.run([sys.executable, "-m", "raybig", "submit", spec_path, *sets],
                           check=True, capture_output=True, text=True, env=env, cwd=str(ROOT))
        job_id = r.stdout.strip().splitlines()[-1]
        running = _first(lambda: any(STATE_PREFIX in ln and '"state": "RUNNING"' in ln
                                     for ln in client.get_job_logs(job_id).splitlines()))
    step = _first(lambda: _has_step(client.get_job_logs(job_id)), every=0.25)
    _first(lambda: str(client.get_job_status(job_id).value) in ("SUCCEEDED", "FAILED", "STOPPED"), every=0.5)
    return running - t0, step - t0


def latency(reps: int) -> list[dict[str, float]]:
    from raybig.cluster.local import LocalCluster
    from raybig.spec import load_spec

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="raybig-bench-"))
    c = LocalCluster(dir=str(tmp / "c"), workers=0, head_cpus=3)
    saved = os.environ.get("RAY_AUTH_TOKEN_PATH")
    rows = []
    try:
        c.up()
        os.environ["RAY_AUTH_TOKEN_PATH"] = c.token_path
        spec_path = str(ROOT / "jobs/debug.yaml")
        overrides = [f"storage.path={tmp / 'runs'}", "sample.max_new_tokens=0", "train.steps=4"]
        for i in range(reps):
            for plain in (True, False):
                ov = [*overrides, f"name=bench-{'plain' if plain else 'raybig'}-{i}"]
                spec = load_spec(spec_path, ov)
                run, step = one_run(c, spec, spec_path, ov, plain)
                rows.append({"rep": i, "plain": plain, "running_s": run, "first_step_s": step})
                print(f"  rep {i} {'ray job submit' if plain else 'raybig submit'}: RUNNING {run:.2f}s, "
                      f"first step {step:.2f}s", file=sys.stderr)
    finally:
        c.down()
        if saved is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = saved
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip-cluster", "--policy-only", dest="skip_cluster", action="store_true",
                    help="only the pure-policy pass (no Ray cluster needed)")
    ap.add_argument("--sizes", default="500x16",
                    help="comma-separated JOBSxNODES for the policy pass, e.g. 500x16,2000x64,10000x256")
    ap.add_argument("--before", action="store_true",
                    help="also time the pre-rewrite policy (tests/test_scheduler_policy.py) on each size")
    ap.add_argument("--seconds", type=float, default=3.0, help="time budget per size and policy")
    a = ap.parse_args()
    if not a.skip_cluster:
        rows = latency(a.reps)
        med = {p: {k: statistics.median(r[k] for r in rows if r["plain"] == p)
                   for k in ("running_s", "first_step_s")} for p in (True, False)}
        print(f"### Submission latency (median of {a.reps}; jobs/debug.yaml, 4 steps, 2 workers)\n")
        print("| path | to RUNNING (s) | to first training step (s) |")
        print("|---|---:|---:|")
        print(f"| `ray job submit` (same entrypoint, no queue) | {med[True]['running_s']:.2f} | "
              f"{med[True]['first_step_s']:.2f} |")
        print(f"| `raybig submit` (validate, queue, gang admission) | {med[False]['running_s']:.2f} | "
              f"{med[False]['first_step_s']:.2f} |")
        print(f"| ratio raybig / plain | {med[False]['running_s'] / med[True]['running_s']:.2f}x | "
              f"{med[False]['first_step_s'] / med[True]['first_step_s']:.2f}x |\n")
    sizes = [tuple(int(x) for x in s.lower().split("x")) for s in a.sizes.split(",") if s]
    policy_scaling(sizes, a.seconds, a.before)


if __name__ == "__main__":
    main()
