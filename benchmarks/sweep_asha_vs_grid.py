"""ASHA against the full grid on the same 8 learning rates of a small model.

Every trial is a real 2-worker DeepSpeed ZeRO-2 Ray Train run on an embedded local Ray. Both sweeps
run the same 8 configurations in the same (shuffled) order; ASHA stops trials at rungs of
grace_period x reduction_factor^k steps. Prints a markdown table: total training steps spent and the
best validation loss found, side by side, and their ratios.

    .venv/bin/python benchmarks/sweep_asha_vs_grid.py [--steps 32] [--storage /tmp/raybig-bench-sweep]
"""

from __future__ import annotations

import argparse
import shutil
import time

# Shuffled once (fixed) so neither method sees the configurations sorted by quality.
LRS = [3.0e-4, 3.0e-2, 1.0e-3, 3.0e-1, 6.0e-3, 1.0e-1, 2.0e-3, 1.0e-4]

TEMPLATE = """\
kind: sweep
name: {name}
storage: {{path: {storage}}}
base:
  seed: 1
  model: {{preset: gpt-debug}}
  data: {{seq_len: 64, max_tokens: 400000}}
  train: {{steps: {steps}, micro_batch_size: 8, warmup_steps: 2, eval_every: {grace}, eval_batches: 4,
          log_every: {grace}}}
  deepspeed: {{zero_stage: 2}}
  resources: {{workers: 2, cpus_per_worker: 0.5}}
  checkpoint: {{every: {steps}, keep: 1, max_failures: 0}}
  sample: {{max_new_tokens: 0}}
search:
  train.lr: {{grid: {lrs}}}
algorithm: grid
scheduler: {scheduler}
grace_period: {grace}
reduction_factor: {rf}
max_concurrent_trials: {conc}
"""


def run(name: str, scheduler: str, args: argparse.Namespace) -> dict:
    from raybig.spec import load_spec_text
    from raybig.tune import run_sweep
    from raybig.tune.report import write_report

    text = TEMPLATE.format(name=name, storage=args.storage, steps=args.steps, grace=args.steps // 8,
                           lrs=LRS, scheduler=scheduler, rf=args.rf, conc=args.concurrent)
    t0 = time.time()
    if args.report_only:  # re-read a finished run's files (e.g. after a report-format fix)
        rep = write_report(f"{args.storage}/{name}", final=True)
    else:
        rep = run_sweep(load_spec_text(text), quiet=True)
    done = [r for r in rep["trials"] if r["state"] == "finished"]
    return {"name": name, "trials": len(rep["trials"]),
            "stopped": sum(r["state"] == "stopped early" for r in rep["trials"]),
            "steps": rep["total_steps"], "best": min(r["metric"] for r in done),
            "best_lr": rep["best"]["params"]["train.lr"], "wall": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=32, help="max steps per trial (grace_period = steps / 8)")
    p.add_argument("--rf", type=float, default=2.0, help="ASHA reduction factor")
    p.add_argument("--concurrent", type=int, default=1, help="trials at once")
    p.add_argument("--storage", default="/tmp/raybig-bench-sweep")
    p.add_argument("--report-only", action="store_true", help="tabulate an earlier run's files; train nothing")
    args = p.parse_args()
    if not args.report_only:
        shutil.rmtree(args.storage, ignore_errors=True)

        from raybig.cluster.ray_env import ensure_ray

        ensure_ray(num_cpus=4, dashboard=True)  # the dashboard frees ASHA-stopped trials' workers
    grid = run("grid", "none", args)
    asha = run("asha", "asha", args)
    print(f"\n{len(LRS)} learning rates {LRS}, gpt-debug, seq_len 64, {args.steps} steps max, 2 workers "
          f"ZeRO-2 per trial, ASHA grace {args.steps // 8} steps, rf {args.rf}, {args.concurrent} trial(s) "
          "at a time\n")
    print("| method | trials | stopped early | training steps | best val_loss | best lr | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in (grid, asha):
        print(f"| {r['name']} | {r['trials']} | {r['stopped']} | {r['steps']} | {r['best']:.4f} | "
              f"{r['best_lr']:g} | {r['wall']:.0f} |")
    print(f"| ASHA / grid | | | {asha['steps'] / grid['steps']:.2f} | "
          f"{asha['best'] / grid['best']:.4f} | | {asha['wall'] / grid['wall']:.2f} |")
    ok = asha["steps"] <= grid["steps"] / 2 and asha["best"] <= grid["best"] * 1.02
    print(f"\ntarget (ASHA <= 1/2 of grid's steps, best within 2%): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
