"""Elastic resume without Ray: worker ranges, the kept global batch, conversion failures, the resume checks."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import pytest

from raybig.errors import CheckpointConversionError, IncompleteCheckpointError, SpecError
from raybig.spec import freeze, load_spec_text
from raybig.spec.paths import edit

pytestmark = pytest.mark.unit

BASE = """kind: train
name: el
model: {{preset: gpt-debug}}
data: {{seq_len: 32}}
resources:
  workers: {workers}
train:
  micro_batch_size: 2
{train}
"""


def spec(workers: str = "2", train: str = "", overrides: list[str] | None = None):
    return load_spec_text(BASE.format(workers=workers, train=train), source="el.yaml", overrides=overrides)


def issue(workers: str = "2", train: str = "", overrides: list[str] | None = None):
    with pytest.raises(SpecError) as e:
        spec(workers, train, overrides)
    (only,) = e.value.issues
    return ".".join(map(str, only.path)), only.line, only.message


# --- resources.workers: an int or {min, max} -----------------------------------------------------


def test_a_range_is_workers_max_and_min_workers_min():
    s = spec("{min: 1, max: 4}")
    assert (s.resources.workers, s.resources.min_workers) == (4, 1)
    assert spec("3").resources.min_workers is None and spec("3").resources.workers == 3
    # The frozen spec.yaml round-trips, and so does the queue's start at a chosen size.
    assert load_spec_text(freeze(s)) == s
    at3 = edit(s, {"resources.workers": 3})
    assert (at3.resources.workers, at3.resources.min_workers) == (3, 1)
    assert load_spec_text(freeze(at3)) == at3
    assert spec("{min: 1, max: 4}", overrides=["resources.workers=3"]).resources.workers == 3  # --set


@pytest.mark.parametrize(("workers", "path", "words"), [
    ("{min: 3, max: 2}", "resources.workers", "min=3 exceeds max=2"),
    ("{min: 0, max: 2}", "resources.workers.min", "between 1 and 4096"),
    ("{mni: 1, max: 2}", "resources.workers.mni", "did you mean 'min'"),
    ("{max: 2}", "resources.workers.min", "required key is missing"),
    ("{min: one, max: 2}", "resources.workers.min", "whole number"),
])
def test_a_bad_range_names_its_yaml_path_and_line(workers, path, words):
    where, line, msg = issue(workers)
    assert where == path and line == 6 and words in msg, (where, line, msg)


def test_min_workers_above_workers_is_refused():
    where, line, msg = issue("3\n  min_workers: 4")
    assert where == "resources.min_workers" and line == 7 and "exceeds workers=3" in msg
    where, _, msg = issue("{min: 2, max: 4}", overrides=["resources.workers=1", "resources.min_workers=2"])
    assert where == "resources.min_workers", msg


# --- train.global_batch_size: grad_accum follows the worker count ---------------------------------


def test_global_batch_derives_grad_accum_and_keeps_tokens_per_step():
    from raybig.spec.deepspeed import build_ds_config

    s = spec("{min: 1, max: 4}", "  global_batch_size: 24")
    seen = {}
    for n in (1, 2, 3, 4):
        at = edit(s, {"resources.workers": n})
        assert at.train.grad_accum == 24 // (2 * n)
        assert at.global_batch() == 24 and at.tokens_per_step() == 24 * 32
        seen[n] = build_ds_config(at)["gradient_accumulation_steps"]
    assert seen == {1: 12, 2: 6, 3: 4, 4: 3}
    # A given grad_accum is replaced (a dumped spec carries the one derived for its own size).
    assert spec("2", "  global_batch_size: 16\n  grad_accum: 7").train.grad_accum == 4
    # Without it the global batch follows the worker count, as before.
    assert edit(spec("2", "  grad_accum: 2"), {"resources.workers": 1}).global_batch() == 4


def test_global_batch_that_does_not_divide_is_refused_with_its_line():
    where, line, msg = issue("3", "  global_batch_size: 16")
    assert where == "train.global_batch_size" and line == 9
    assert "not a multiple of micro_batch_size x workers = 2 x 3 = 6" in msg
    # Every size of a range must divide it: the queue may start the job at any of them.
    where, line, msg = issue("{min: 2, max: 4}", "  global_batch_size: 16")
    assert where == "train.global_batch_size" and "3 workers" in msg and "multiple of 24" in msg
    where, _, msg = issue("1", "  global_batch_size: 40000")
    assert where == "train.global_batch_size" and "at most 4096" in msg


# --- the resume checks ----------------------------------------------------------------------------


def _fake_checkpoint(folder: pathlib.Path, world_size: int, step: int = 4) -> pathlib.Path:
    """A checkpoint folder shaped like Ray's merge of DeepSpeed's shards, with damaged shard bytes."""
    from raybig.train.checkpoints import write_manifest

    tag = folder / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (folder / "latest").write_text(tag.name)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"not a torch file" * 4)
    for r in range(world_size):
        (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 64)
    for r in range(world_size):
        write_manifest(str(folder), r, world_size, step)
    return folder


def _digest(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failing_conversion_is_one_line_and_leaves_the_checkpoint(tmp_path):
    from raybig.train.universal import convert, universal_path

    ckpt = _fake_checkpoint(tmp_path / "run" / "checkpoint_1", world_size=2)
    before = _digest(ckpt)
    out = universal_path(str(tmp_path / "run"), str(ckpt), 2)
    with pytest.raises(CheckpointConversionError) as e:
        convert(str(ckpt), out, zero_stage=2)
    msg = str(e.value)
    assert e.value.exit_code == 1 and "\n" not in msg and len(msg) < 600, msg
    assert "written by 2 workers" in msg and "the checkpoint is unchanged" in msg and "Traceback" not in msg
    assert _digest(ckpt) == before and not os.path.exists(out)
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint_1"]  # no staging folder left either


def test_an_incomplete_checkpoint_is_refused_before_converting(tmp_path):
    from raybig.train.universal import convert

    ckpt = _fake_checkpoint(tmp_path / "checkpoint_1", world_size=2)
    (ckpt / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(IncompleteCheckpointError, match="rank 1"):
        convert(str(ckpt), str(tmp_path / "uni"), zero_stage=3)


def test_which_checkpoints_need_converting(tmp_path):
    from raybig.train.preflight import checkpoint_world_size, resume_problems
    from raybig.train.universal import conversion_needed

    ckpt = str(_fake_checkpoint(tmp_path / "checkpoint_1", world_size=2))
    one = spec("1")
    assert checkpoint_world_size(ckpt) == 2
    assert conversion_needed(one, 2) and not conversion_needed(spec("2"), 2)
    assert not conversion_needed(edit(one, {"deepspeed.zero_stage": 0}), 2)  # each rank holds it all
    assert resume_problems(one, ckpt) == []  # converted by the runner, not refused
    # A universal folder resumes at any size.
    man = tmp_path / "uni" / "raybig-manifest-rank0.json"
    man.parent.mkdir()
    man.write_text(json.dumps({"rank": 0, "world_size": 1, "step": 4, "files": {}, "universal": True}))
    assert checkpoint_world_size(str(man.parent)) is None


def test_lora_checkpoints_of_another_size_are_refused(tmp_path):
    from raybig.train.preflight import resume_problems

    ckpt = str(_fake_checkpoint(tmp_path / "checkpoint_1", world_size=2))
    lora = edit(spec("1"), {"finetune.method": "lora", "init_from": str(tmp_path)})
    (line,) = resume_problems(lora, ckpt)
    assert "written by 2 workers" in line and "LoRA" in line and "resources.workers: 2" in line


def test_a_rerun_on_another_worker_count_is_carried(tmp_path):
    """`raybig run` of the same run at another size resumes (the runner converts), not ResumeMismatch."""
    from raybig.train.compat import check_resume_compatible

    storage = tmp_path / "runs"
    s2 = edit(spec("2", "  global_batch_size: 8"), {"storage.path": str(storage)})
    run = storage / "el"
    _fake_checkpoint(run / "checkpoint_1", world_size=2)
    (run / "spec.yaml").write_text(freeze(s2))
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_1"}}))
    plan = check_resume_compatible(edit(s2, {"resources.workers": 1}), str(run))
    assert plan.resume_step == 4 and "resources.workers" in plan.changed and "train.grad_accum" in plan.changed
