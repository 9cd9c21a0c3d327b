"""The learning-rate schedule continues across a resume that changes `train.steps` (issue 20).

Values come from DeepSpeed's own WarmupCosineLR, built from raybig's generated config as the engine
builds it, and driven as a resumed engine drives it: its step counter loaded from the checkpoint,
then one scheduler step per optimizer step.
"""

from __future__ import annotations

import math

import pytest

from raybig.spec import load_spec_text
from raybig.spec.deepspeed import build_ds_config, schedule_ratio
from raybig.spec.models import ScheduleFrom
from raybig.train.compat import continued_schedule, lr_ratio

pytestmark = pytest.mark.unit

SPEC = """kind: train
name: sched
model: {{preset: gpt-debug}}
data: {{path: "stdlib://", seq_len: 32}}
train: {{steps: {steps}, lr: 1.0e-3, min_lr_ratio: 0.1, warmup_steps: 10}}
resources: {{workers: 1}}
"""


def _spec(steps: int, schedule_from: ScheduleFrom | None = None):
    spec = load_spec_text(SPEC.format(steps=steps), source="t.yaml")
    return spec.model_copy(update={"train": spec.train.model_copy(update={"schedule_from": schedule_from})})


def _deepspeed_lrs(spec, resume_at: int | None, until: int) -> dict[int, float]:
    """lr DeepSpeed sets at each scheduler iteration i, from `resume_at` (its counter loaded) or 0."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    cfg = build_ds_config(spec, on_cuda=False)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg["optimizer"]["params"]["lr"])
    sched = WarmupCosineLR(opt, **cfg["scheduler"]["params"])
    if resume_at is not None:  # as engine.load_checkpoint(load_lr_scheduler_states=True) leaves it
        sched.load_state_dict({"last_batch_iteration": resume_at - 1})
    out = {}
    while sched.last_batch_iteration < until:
        sched.step()
        out[sched.last_batch_iteration] = sched.get_last_lr()[0]
    return out


def test_a_fresh_schedule_is_deepspeeds_warmup_cosine():
    spec = _spec(100)
    lrs = _deepspeed_lrs(spec, None, 105)
    for i, lr in lrs.items():
        assert lr == pytest.approx(1e-3 * schedule_ratio(spec.train, i), abs=1e-12)
        assert schedule_ratio(spec.train, i) == pytest.approx(lr_ratio(i, 100, 10, 0.1))
    assert lrs[100] == pytest.approx(1e-4)


@pytest.mark.parametrize("at, old_steps, new_steps", [(60, 100, 200), (100, 100, 150), (5, 100, 300),
                                                      (60, 100, 80)])
def test_extending_or_shortening_steps_continues_the_schedule(at, old_steps, new_steps):
    """No jump at the resume, no second warmup, the floor at the new last step."""
    old = _spec(old_steps)
    f = continued_schedule(old.train, _spec(new_steps).train, at)
    if at < 10:  # inside the warmup: the new warmup-cosine goes on rising from the same value
        assert f is None
    else:
        assert f is not None and f.step == at and f.ratio == pytest.approx(schedule_ratio(old.train, at))
    new = _spec(new_steps, f)
    before = _deepspeed_lrs(old, None, at)
    after = _deepspeed_lrs(new, at, new_steps + 3)
    for i, lr in after.items():
        assert lr == pytest.approx(1e-3 * schedule_ratio(new.train, i), rel=1e-9, abs=1e-15)
    # Continuous: the first rate after the resume is the one the old schedule had there.
    assert after[at] == pytest.approx(before[at], rel=1e-9)
    largest_old_step = max(abs(before[i + 1] - before[i]) for i in range(len(before) - 1))
    if at >= 10:  # past warmup: from here it only goes down (or stays), never back up
        seq = [after[i] for i in sorted(after)]
        assert all(b <= a + 1e-15 for a, b in zip(seq, seq[1:], strict=False))
        assert max(a - b for a, b in zip(seq, seq[1:], strict=False)) <= largest_old_step + 1e-12
    else:  # resumed inside the warmup: it goes on warming up to the peak, then the new cosine
        assert after[at] < 1e-3 and max(after.values()) == pytest.approx(1e-3, rel=1e-3)
    assert after[new_steps] == pytest.approx(1e-4)
    assert after[new_steps + 3] == pytest.approx(1e-4)


def test_extending_a_finished_run_stays_at_the_floor():
    old = _spec(100)
    f = continued_schedule(old.train, _spec(150).train, 100)
    lrs = _deepspeed_lrs(_spec(150, f), 100, 150)
    assert all(v == pytest.approx(1e-4) for v in lrs.values())


def test_a_second_extension_continues_the_continued_curve():
    first = continued_schedule(_spec(100).train, _spec(150).train, 60)
    mid = _spec(150, first)
    second = continued_schedule(mid.train, _spec(300).train, 120)
    assert second.ratio == pytest.approx(schedule_ratio(mid.train, 120))
    lrs_mid = _deepspeed_lrs(mid, 60, 120)
    lrs = _deepspeed_lrs(_spec(300, second), 120, 300)
    assert lrs[120] == pytest.approx(lrs_mid[120], rel=1e-9)
    assert lrs[300] == pytest.approx(1e-4)
    # A plain re-run (same steps) keeps the recorded continuation.
    assert continued_schedule(mid.train, _spec(150).train, 130) == first


def test_the_continued_cosine_has_the_documented_shape():
    f = ScheduleFrom(step=40, ratio=0.7)
    t = _spec(140, f).train
    for i in (40, 65, 90, 115, 140, 200):
        p = min(1.0, (i - 40) / 100)
        assert schedule_ratio(t, i) == pytest.approx(0.1 + 0.6 * (1 + math.cos(math.pi * p)) / 2)
