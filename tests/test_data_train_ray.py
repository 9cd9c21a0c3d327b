"""`raybig run` on jsonl + parquet instruction data: 2 workers, ZeRO-2, packed response-only rows, resume in place.

Runs the real CLI in-process (click's runner) on the session's local Ray (`ray_local`), so no Ray
start-up is paid twice. Run with: flock /tmp/raybig-ray.lock pytest tests/test_data_train_ray.py
"""

from __future__ import annotations

import glob
import importlib.util
import json
import pathlib
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from raybig.cli import main
from raybig.data.shards import ShardBatches
from raybig.train.result import TrainResult

pytestmark = pytest.mark.ray
ROOT = pathlib.Path(__file__).resolve().parent.parent

JOB = """kind: train
name: inst
seed: 5
model: {preset: gpt-debug}
data: {path: [data/inst.jsonl, data/inst.parquet], seq_len: 64, response_field: response, val_fraction: 0.05}
train: {steps: 4, micro_batch_size: 8, lr: 1.0e-2, warmup_steps: 0, min_lr_ratio: 1.0, eval_every: 4,
        eval_batches: 1, log_every: 1}
deepspeed: {zero_stage: 2}
resources: {workers: 2, cpus_per_worker: 1}
storage: {path: ./runs}
checkpoint: {every: 4, keep: 1}
sample: {max_new_tokens: 0}
"""


def _make_records(n: int) -> list[dict]:
    spec = importlib.util.spec_from_file_location("mkdata", ROOT / "scripts" / "make_instruction_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_records(n, seed=0)


def test_instruction_jsonl_zero2_learns_and_resumes_at_its_shard_position(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    # Half the examples in jsonl, half in parquet: one spec trains from both formats at once.
    records = _make_records(600)
    (tmp_path / "data" / "inst.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:300]))
    pq.write_table(pa.Table.from_pylist(records[300:]), tmp_path / "data" / "inst.parquet")
    (tmp_path / "job.yaml").write_text(JOB)
    cli = CliRunner()

    first = cli.invoke(main, ["run", "job.yaml"])
    assert first.exit_code == 0, first.output
    assert "data: prepared" in first.output, first.output
    # Resume the same run to twice the steps: the shards are reused and training picks up at step 4.
    second = cli.invoke(main, ["run", "job.yaml", "--set", "train.steps=8"])
    assert second.exit_code == 0, second.output
    assert "data: reusing prepared" in second.output, second.output

    res = TrainResult.from_run_dir(str(tmp_path / "runs" / "inst"))
    assert res.resumed_from_step == 4 and res.metrics["step"] == 8
    print(f"resumed run: {res.seconds} s, {res.seconds_to_first_step} s to its first step")
    hist = {h["step"]: h for h in res.history if "loss" in h}
    assert sorted(hist) == list(range(1, 9))
    first_losses = (hist[1]["loss"] + hist[2]["loss"]) / 2
    last_losses = (hist[7]["loss"] + hist[8]["loss"]) / 2
    assert last_losses < first_losses - 1.0, (first_losses, last_losses)  # response tokens only: learns fast
    assert res.val_loss_last is not None and res.val_loss_last < res.val_loss_first - 0.5

    # Every step, before and after the resume, read exactly the rows rank 0's share gives (step, micro 0).
    (index,) = glob.glob(str(tmp_path / "runs" / ".prepared" / "*" / "index.json"))
    rank0 = ShardBatches(str(pathlib.Path(index).parent), 64, 8, seed=5, rank=0, world_size=2)
    assert rank0.packed and rank0.masked
    for step, h in hist.items():
        assert h["data_digest"] == zlib.crc32(rank0.get(step - 1, 0).x.tobytes()), step
        assert 0 <= h["data_wait_frac"] < 0.5
