"""Distillation (Hinton et al. 2015) through raybig's real training loop and DeepSpeed: a student
distilled from a trained teacher export beats the same student trained without it, at equal steps,
on validation loss (the student's own cross-entropy on the held-out split).

Setup (small-data regime, where soft targets help most, as in the paper's section 3): the teacher is
a digits MLP trained on the whole training split; both students are a narrower MLP trained on 50
examples (5 per class) and validated on the full validation split. On 50 examples hard labels
alone generalise poorly (the plain student fits them all and its validation loss stays high); the
teacher's soft targets carry how each digit resembles the others. Measured: at 150 steps plain
val_loss 0.51, distilled 0.36-0.42 over (alpha, T) in {(0.5, 2), (0.7, 2), (0.5, 4), (0.9, 1)}. The trainings run `raybig.train.loop.train_worker` in one subprocess (world size 1, gloo,
DeepSpeed ZeRO-2 on the CPU), not under Ray: the loop and the teacher are the components under test,
and a subprocess keeps torch.distributed out of the pytest process.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parent.parent

COMMON = """
kind: train
task: classification
train: {{steps: {steps}, micro_batch_size: 32, lr: 1.0e-2, warmup_steps: 2, weight_decay: 0.0,
        eval_every: {steps}, eval_batches: 4, log_every: 10}}
deepspeed: {{zero_stage: 2}}
resources: {{workers: 1, cpus_per_worker: 1}}
storage: {{path: {root}/runs}}
checkpoint: {{every: {steps}, keep: 1}}
"""


class _Reporter:
    rank, world_size = 0, 1

    def __init__(self):
        self.records: list[dict] = []

    @contextlib.contextmanager
    def resume_dir(self):
        yield None

    def report(self, metrics, checkpoint_dir=None):
        self.records.append(dict(metrics))


def _train(path: str, run_dir: str) -> dict:
    from raybig.spec import load_spec
    from raybig.train.loop import train_worker

    return train_worker(load_spec(path), _Reporter(), run_dir)


def main(root: str) -> None:
    """Teacher, distilled student, plain student; prints one JSON line of the results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(20000 + os.getpid() % 20000), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import deepspeed
    import torch

    from raybig.train.loop import disable_shm_comm_build

    torch.set_num_threads(1)
    disable_shm_comm_build()  # else init_distributed JIT-builds DeepSpeed's shm op (minutes)
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for name in ("teacher", "distilled", "distilled_z3", "plain"):
        out[name] = _train(f"{root}/{name}.yaml", f"{root}/runs/{name}")
    print("RESULT " + json.dumps({k: {m: v for m, v in r.items() if m.startswith(("val_", "loss", "accuracy",
                                                                                  "distill"))}
                                  for k, r in out.items()}))


def test_distilled_student_beats_plain_student(tmp_path):
    from raybig.train.classifiers import load_digits_split

    split = load_digits_split(seed=0)
    few = np.concatenate([np.flatnonzero(split.y_train == c)[:5] for c in range(10)])  # 5 per class
    np.savez(tmp_path / "few.npz", x_train=split.x_train[few], y_train=split.y_train[few], x_val=split.x_val,
             y_val=split.y_val)
    (tmp_path / "teacher.yaml").write_text(
        "name: teacher\nclassifier: {arch: mlp, hidden: [128, 64]}\n" + COMMON.format(steps=120, root=tmp_path))
    student = f"classifier: {{arch: mlp, hidden: [32], dataset: {tmp_path}/few.npz}}\n" + COMMON.format(
        steps=150, root=tmp_path)
    distill = f"distill: {{teacher: {tmp_path}/runs/teacher, temperature: 4.0, alpha: 0.5}}\n"
    (tmp_path / "distilled.yaml").write_text("name: distilled\n" + distill + student)
    (tmp_path / "plain.yaml").write_text("name: plain\n" + student)
    # At ZeRO-3 the teacher runs as a ZeRO-Inference engine (`shard_teacher`), not a plain module.
    (tmp_path / "distilled_z3.yaml").write_text("name: distilled_z3\n" + distill + student.replace(
        "zero_stage: 2", "zero_stage: 3"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=400, cwd=str(tmp_path))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    res = json.loads(line[len("RESULT "):])
    t, d, d3, p = res["teacher"], res["distilled"], res["distilled_z3"], res["plain"]
    assert t["val_accuracy"] >= 0.9, res
    assert "distill_loss" in d and "distill_loss" not in p, res
    # Equal steps, same student, same 50 examples: the teacher's soft targets generalise better.
    assert d["val_loss"] < p["val_loss"] * 0.9 and d["val_accuracy"] >= p["val_accuracy"], res
    assert "val_distill_loss" not in d, res  # validation scores the student's own data loss
    assert d3["val_loss"] < p["val_loss"] * 0.9 and "distill_loss" in d3, res
    assert os.path.isdir(tmp_path / "runs" / "distilled" / "export")


if __name__ == "__main__":
    main(sys.argv[1])
