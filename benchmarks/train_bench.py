"""raybig training against plain DeepSpeed (torchrun), side by side in one run.

Same model, data, DeepSpeed config and step count; only the launcher differs (Ray Train workers,
metric reporting and checkpoint plumbing vs. a bare torchrun loop). Prints markdown tables:

    .venv/bin/python benchmarks/train_bench.py                 # throughput + start-up, gpt-tiny ZeRO-2
    .venv/bin/python benchmarks/train_bench.py --memory        # per-rank model-state memory, ZeRO 0-3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def spec_text(name: str, storage: str, preset: str, stage: int, steps: int, mbs: int, seq: int,
              log_every: int = 1) -> str:
    return f"""
kind: train
name: {name}
seed: 0
model: {{preset: {preset}}}
data: {{path: "stdlib://", seq_len: {seq}}}
train: {{steps: {steps}, micro_batch_size: {mbs}, lr: 1.0e-3, warmup_steps: 1, eval_every: 100000,
        eval_batches: 1, log_every: {log_every}}}
deepspeed: {{zero_stage: {stage}}}
resources: {{workers: 2, cpus_per_worker: 1}}
storage: {{path: {storage}}}
checkpoint: {{every: 100000, keep: 1}}
sample: {{max_new_tokens: 0}}
"""


def run_plain(path: str) -> dict:
    out = path + ".plain.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(_free_port()), os.path.join(HERE, "_plain_deepspeed.py"), path, out],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = json.load(open(out))
    res["wall_s"] = time.time() - t0
    res["ready_s"] = res["ready_at"] - t0
    return res


def run_raybig(path: str) -> dict:
    from raybig.spec import load_spec
    from raybig.train.runner import run_train

    arrivals: dict[int, float] = {}
    t0 = time.time()
    res = run_train(load_spec(path), on_metrics=lambda m: arrivals.setdefault(m["step"], time.time()))
    return {"wall_s": time.time() - t0, "arrivals": arrivals, "t0": t0, "history": res.history,
            "loss": res.metrics.get("loss")}


def _free_port() -> int:
    from raybig.cluster.ray_env import free_port

    return free_port()


def throughput(args: argparse.Namespace) -> None:
    import ray

    from raybig.cluster.ray_env import ensure_ray

    ensure_ray(None, num_cpus=3)
    tmp = tempfile.mkdtemp(prefix="raybig-bench-")
    steps = args.steps
    path = os.path.join(tmp, "spec.yaml")
    with open(path, "w") as f:
        f.write(spec_text("bench", tmp, args.preset, args.stage, steps, args.mbs, args.seq, args.log_every))
    rows = []
    for _rep in range(args.repeats):  # alternate, so drift on a shared box hits both alike
        p = run_plain(path)
        r = run_raybig(path)
        w = args.warmup
        # Both sides: rank 0's wall clock from step w to the step before the last (which carries the
        # final checkpoint and export in raybig), so per-step overheads of either launcher count.
        a = r["arrivals"]
        lo, hi = w, steps - args.log_every  # raybig reports every log_every steps (its default is 10)
        p_step = (p["stamps"][hi - 1] - p["stamps"][lo - 1]) / (hi - lo)
        r_step = (a[hi] - a[lo]) / (hi - lo)
        r_first = a[0] - r["t0"]  # the step-0 validation report: the loop is about to take step 1
        rows.append((p_step, r_step, p["ready_s"], r_first, p["wall_s"], r["wall_s"]))
        import shutil

        shutil.rmtree(os.path.join(tmp, "bench"), ignore_errors=True)  # fresh run, no auto-resume
    tok = args.mbs * args.seq * 2
    p_step, r_step = (statistics.median(x[i] for x in rows) for i in (0, 1))
    p_first, r_first = (statistics.median(x[i] for x in rows) for i in (2, 3))
    p_wall, r_wall = (statistics.median(x[i] for x in rows) for i in (4, 5))
    print(f"\n{args.preset}, ZeRO-{args.stage}, 2 CPU workers, micro-batch {args.mbs} x seq {args.seq}, "
          f"{steps} steps, raybig logging every {args.log_every}, median of {args.repeats} alternating runs\n")
    print("| | plain DeepSpeed (torchrun) | raybig (Ray Train) | raybig / plain |")
    print("|---|---:|---:|---:|")
    print(f"| steady-state step time | {p_step * 1e3:.1f} ms | {r_step * 1e3:.1f} ms | {r_step / p_step:.3f} |")
    print(f"| tokens/s | {tok / p_step:,.0f} | {tok / r_step:,.0f} | {p_step / r_step:.3f} |")
    print(f"| launch to training loop start | {p_first:.1f} s | {r_first:.1f} s | {r_first / p_first:.2f} |")
    print(f"| wall, launch to exit | {p_wall:.1f} s | {r_wall:.1f} s | {r_wall / p_wall:.2f} |")
    ray.shutdown()


def memory(args: argparse.Namespace) -> None:
    from raybig.spec import load_spec
    from raybig.spec.memory import estimate, human

    tmp = tempfile.mkdtemp(prefix="raybig-bench-")
    print(f"\n{args.mem_preset}, 2 CPU workers, fp32, Adam, after {args.mem_steps} steps, measured after the last backward; max over ranks of the "
          f"bytes held by live tensors (params, grads, optimizer state, DeepSpeed buffers) vs the ZeRO "
          f"formula; RSS growth for reference\n")
    print("| ZeRO stage | formula / rank | live tensors / rank | measured / formula | RSS growth / rank |")
    print("|---:|---:|---:|---:|---:|")
    for stage in (0, 1, 2, 3):
        path = os.path.join(tmp, f"m{stage}.yaml")
        with open(path, "w") as f:
            f.write(spec_text(f"m{stage}", tmp, args.mem_preset, stage, args.mem_steps, 1, 64))
        est = estimate(load_spec(path)).total
        res = run_plain(path)
        got = res["tensor_bytes"]
        print(f"| {stage} | {human(est)} | {human(got)} | {got / est:.2f} | {human(res['rss_growth'])} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", action="store_true", help="ZeRO 0-3 memory table instead of throughput")
    ap.add_argument("--preset", default="gpt-tiny")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out; a multiple of --log-every")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--mbs", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mem-preset", default="gpt2-125m")
    ap.add_argument("--mem-steps", type=int, default=2)
    a = ap.parse_args()
    memory(a) if a.memory else throughput(a)
