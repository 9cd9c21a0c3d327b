"""The digits MLP: raybig (2 Ray Train workers, DeepSpeed ZeRO-2) against a plain single-process PyTorch loop.

    flock /tmp/raybig-ray.lock .venv/bin/python benchmarks/digits_bench.py [--repeats 2]

Both train `jobs/digits.yaml`'s model (MLP 64-128-64-10) on the same stratified split for the same
optimizer steps and global batch (80 x 64 examples, ~3.6 epochs of the 1,437 training images), with
AdamW (weight decay 0), the same peak learning rate and warmup-cosine schedule, and report the
validation accuracy over all 360 held-out images. The plain loop is one process, one thread, no
DeepSpeed; raybig's wall time is `run_train`'s (embedded Ray already up, so it counts worker start,
DeepSpeed init, evaluation, checkpoint and export, but not Ray's own start).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plain(spec: object) -> tuple[float, float]:
    """(validation accuracy, seconds) of the single-process loop."""
    import torch

    from raybig.train.classifiers import build_for_spec, split_for_spec

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    split = split_for_spec(spec)
    torch.manual_seed(spec.seed)  # type: ignore[attr-defined]
    built = build_for_spec(spec)
    model, task, t = built.model, built.task, spec.train  # type: ignore[attr-defined]
    batch = t.micro_batch_size * spec.resources.workers  # type: ignore[attr-defined]
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    warm, floor = t.warmup, t.min_lr_ratio

    def lr_at(step: int) -> float:
        if step < warm:
            return t.lr * (step + 1) / warm
        p = (step - warm) / max(1, t.steps - warm)
        return t.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))

    xt, yt = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    g = torch.Generator().manual_seed(spec.seed)  # type: ignore[attr-defined]
    for step in range(t.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        idx = torch.randint(len(yt), (batch,), generator=g)
        loss, _ = task.loss_and_metrics(model, (xt[idx], yt[idx]))
        opt.zero_grad()
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
    model.eval()
    with torch.no_grad():
        _, m = task.loss_and_metrics(model, (torch.from_numpy(split.x_val), torch.from_numpy(split.y_val)))
    return m["accuracy"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from raybig.cluster.ray_env import ensure_ray
    from raybig.eval.run import run_classification
    from raybig.spec import load_spec
    from raybig.train.runner import run_train

    ensure_ray(num_cpus=4)
    rows = []
    for rep in range(args.repeats):
        tmp = tempfile.mkdtemp(prefix="raybig-digits-bench-")
        spec = load_spec(os.path.join(ROOT, "jobs", "digits.yaml"), [f"storage.path={tmp}", f"name=digits-{rep}"])
        acc_plain, s_plain = plain(spec)
        t0 = time.perf_counter()
        res = run_train(spec)
        s_raybig = time.perf_counter() - t0
        acc_raybig = run_classification(spec, f"{res.run_dir}/export")["val_accuracy"]
        row = {"repeat": rep, "plain_acc": acc_plain, "plain_s": s_plain, "raybig_acc": acc_raybig,
               "raybig_s": s_raybig}
        rows.append(row)
        print(json.dumps(row), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("plain_acc", "plain_s", "raybig_acc", "raybig_s")}
    print(f"\ndigits MLP, 80 steps x 64 examples, median of {len(rows)}:\n")
    print("| | validation accuracy | wall time |")
    print("|---|---:|---:|")
    print(f"| plain PyTorch, 1 process | {med['plain_acc']:.3f} | {med['plain_s']:.1f} s |")
    print(f"| raybig, 2 workers, ZeRO-2 | {med['raybig_acc']:.3f} | {med['raybig_s']:.1f} s |")


if __name__ == "__main__":
    main()
