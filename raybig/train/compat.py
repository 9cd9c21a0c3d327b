"""Can a re-run of a spec resume the run already in its directory? Decided on the driver, before Ray starts.

`raybig run` on a spec whose `<storage>/<name>/` already holds a run resumes it from its newest
checkpoint (Ray Train's auto-resume). That is right when the spec is the same, or changed only in
what a checkpoint can carry (more steps, a new learning rate, evaluation or checkpoint cadence). It
is wrong when the checkpoint cannot be loaded into what the new spec builds (another model shape or
tokenizer, another ZeRO stage: the shards are per stage; another worker count is converted, see
`raybig.train.universal`). Today's spec
is compared with the run's recorded `spec.yaml` (`check_resume_compatible`):

- unchanged, or changed only in carried fields: the run resumes; the plan's `notes` say what changed;
- a field no checkpoint carries changed: `ResumeMismatch` (exit 2), one line naming the fields and
  the two ways out (a new `name`, or `init_from: <run dir>` to start a new run from its weights);
  nothing is started and the recorded `spec.yaml` is left as it was;
- the checkpoint is already at (or past) `train.steps` and the export exists: the run is complete;
  the plan carries its `TrainResult` and nothing needs to start.

Learning-rate schedule on a resume that changes `train.steps`: the schedule continues from where it
was. DeepSpeed keeps only its step counter in a checkpoint, and a warmup-cosine rebuilt over the new
length would jump (extending a finished run would climb from the floor back up the longer cosine).
So the plan records `train.schedule_from = {step, ratio}`: the resumed step and the old schedule's
ratio there (`raybig.spec.deepspeed.schedule_ratio`, the old schedule as recorded, itself possibly
continued). From that step the rate follows a cosine from `ratio x lr` down to `min_lr_ratio x lr`
at the new `train.steps`: no new warmup, no jump. Extending a run that already reached its floor
stays at the floor; a run cut short mid-cosine decays over what is left; a run resumed while its
warmup was still rising keeps warming up to the peak of the new length's cosine. The run's `spec.yaml`
keeps `schedule_from`, so a later re-run (or a restart) follows the same curve, and a further change
of `train.steps` continues from the continued curve. A changed `train.lr` scales the curve.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from raybig import storage
from raybig.errors import ResumeMismatch
from raybig.spec.deepspeed import schedule_ratio
from raybig.spec.models import ScheduleFrom, TrainLoopSpec, TrainSpec
from raybig.train.result import TrainResult, export_of

SPEC_FILE = "spec.yaml"

# Fields a checkpoint carries: the same network, optimizer shards and ranks load fine.
# Dotted paths; a path covers everything below it.
CARRIED = (
    "train.steps", "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.weight_decay",
    "train.betas", "train.grad_clip", "train.eval_every", "train.eval_batches", "train.log_every",
    "train.activation_checkpointing", "train.micro_batch_size", "train.grad_accum", "train.schedule_from",
    "checkpoint", "sample", "priority", "max_retries", "preemptible", "seed", "storage", "init_from",
    "resources.cpus_per_worker", "resources.memory_per_worker", "resources.custom",
    # Another worker count: the runner converts the ZeRO checkpoint (raybig.train.universal).
    "resources.workers", "resources.min_workers", "train.global_batch_size",
    "data.path", "data.max_bytes", "data.max_tokens", "data.val_fraction", "data.split_seed", "data.format",
    "data.text_field", "data.prompt_template", "data.response_field", "data.messages_field",
    "data.on_bad_record", "data.shard_tokens", "data.prepared_path", "data.packed", "model.dropout", "finetune.merge", "finetune.dropout",
    "eval", "tracking", "classifier.dropout", "classifier.dataset", "classifier.val_fraction",
)
# Why a field cannot change under a checkpoint (the first matching prefix wins; anything that is
# neither carried nor listed here is refused as "not carried by a checkpoint").
REASONS = (
    ("resources.gpus_per_worker", "the checkpoint was written on other devices"),
    ("deepspeed.zero_stage", "DeepSpeed checkpoints are partitioned per ZeRO stage"),
    ("deepspeed", "DeepSpeed's checkpoint layout depends on it"),
    ("data.tokenizer", "another tokenizer means other token ids"),
    ("model.vocab_size", "the embedding has another shape"),
    ("model", "the network has another shape"),
    ("data.seq_len", "the plug-in model is built for its seq_len"),
    ("finetune", "the checkpoint holds another set of trainable weights"),
)


@dataclass
class ResumePlan:
    """What a (re-)run of a train spec will do with its run directory.

    Attributes:
        run_dir: the run directory checked.
        resume_step: the step of the checkpoint the run resumes from; None when it starts at step 0.
        changed: dotted paths whose value differs from the recorded spec (all carried by a checkpoint).
        notes: lines for a person (what resumes, what changed, how the learning rate continues).
        complete: the run already reached `train.steps`; `result` is its result, nothing needs to run.
        result: the finished run's `TrainResult` when `complete`, else None.
        schedule_from: where the learning-rate schedule continues from (`with_schedule` puts it in the
            spec the run trains with), or None.
    """

    run_dir: str
    resume_step: int | None = None
    changed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    complete: bool = False
    result: TrainResult | None = None
    schedule_from: ScheduleFrom | None = None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _recorded(run_dir: str) -> dict[str, Any] | None:
    """The recorded spec as JSON-mode data, defaults filled in when it still validates; None if absent."""
    uri = storage.join(run_dir, SPEC_FILE)
    if not storage.exists(uri):
        return None
    text = storage.read_text(uri)
    try:
        from raybig.spec import load_spec_text

        old = load_spec_text(text, source=uri, resolve_secrets=False)
        return old.model_dump(mode="json")
    except Exception:  # noqa: BLE001 - an older or hand-edited file: compare what it says
        data = yaml.safe_load(text)
        return data if isinstance(data, dict) else None


def _checkpoint_step(run_dir: str) -> tuple[bool, int | None]:
    """(a checkpoint exists, its step when known) for the checkpoint a re-run resumes from."""
    from raybig.train.checkpoints import MANIFEST, latest_checkpoint, newest_complete_checkpoint

    try:
        ckpt = latest_checkpoint(run_dir)
    except (ValueError, OSError, KeyError, AttributeError):
        ckpt = newest_complete_checkpoint(run_dir)  # what the runner's recover_snapshot picks
    if ckpt is None:
        return False, None
    try:
        return True, int(json.loads(storage.read_text(storage.join(ckpt, MANIFEST.format(rank=0))))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return True, None


def _reason(path: str, spec: TrainSpec) -> str | None:
    """None when a checkpoint carries a change of `path`, else why not."""
    if path == "data.seq_len" and spec.model.target is None:
        return None  # the GPT's weights do not depend on seq_len (<= block_size is validated)
    if any(_under(path, p) for p in CARRIED):
        return None
    return next((why for p, why in REASONS if _under(path, p)), "a checkpoint does not carry it")


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 24 else s[:21] + "..."


def lr_ratio(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """DeepSpeed WarmupCosineLR's learning-rate ratio after `step` steps of a `steps`-long schedule.

    Linear warmup over `warmup` steps (DeepSpeed uses at least 2), then a cosine to `min_ratio`,
    clamped there past the end (`schedule_ratio` of a schedule that was never continued).
    """
    w = max(2, warmup)
    if step < w:
        return step / w
    progress = min(1.0, (step - w + 1) / max(1, steps - w))
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


def _old_train(old: dict[str, Any], spec: TrainSpec) -> TrainLoopSpec:
    """The recorded run's train section (what its schedule was), new values where it says nothing."""
    o = old.get("train") if isinstance(old.get("train"), dict) else {}
    try:
        return TrainLoopSpec.model_validate({**spec.train.model_dump(exclude={"schedule_from"}), **(o or {})})
    except Exception:  # noqa: BLE001 - an older or hand-edited file: the fields it has, one by one
        keep = {k: v for k, v in (o or {}).items() if k in ("steps", "lr", "min_lr_ratio", "warmup_steps")}
        try:
            return spec.train.model_copy(update={**keep, "schedule_from": None})
        except Exception:  # noqa: BLE001
            return spec.train


def continued_schedule(old_train: TrainLoopSpec, new_train: TrainLoopSpec, step: int) -> ScheduleFrom | None:
    """Where a resume at `step` continues the learning-rate schedule from (see the module docstring).

    Returns:
        `ScheduleFrom(step, the old schedule's ratio at step)` when `train.steps` changed (None while
        the old warmup was still rising: the new schedule's warmup goes on from the same value); the
        recorded `schedule_from` when it did not (a plain re-run keeps the continued curve); else None.
    """
    if new_train.schedule_from is not None:  # set by hand: the spec says where it continues
        return new_train.schedule_from
    if old_train.steps != new_train.steps:
        if old_train.schedule_from is None and step < max(2, old_train.warmup):
            return None  # still warming up: the new warmup-cosine rises exactly as the old one did
        return ScheduleFrom(step=step, ratio=min(1.0, max(0.0, schedule_ratio(old_train, step))))
    return old_train.schedule_from


def with_schedule(spec: TrainSpec, plan: ResumePlan) -> TrainSpec:
    """`spec` with the plan's `train.schedule_from` (unchanged when the plan has none)."""
    if plan.schedule_from is None or spec.train.schedule_from == plan.schedule_from:
        return spec
    return spec.model_copy(update={"train": spec.train.model_copy(update={"schedule_from": plan.schedule_from})})


def _schedule_note(old_train: TrainLoopSpec, spec: TrainSpec, f: ScheduleFrom) -> str:
    t = spec.train
    before = old_train.lr * schedule_ratio(old_train, f.step)
    now = t.lr * f.ratio
    floor = t.lr * t.min_lr_ratio
    scaled = f" (scaled from {before:.3g} by the new train.lr)" if abs(now - before) > 1e-12 + 1e-6 * before else ""
    way = "stays at" if abs(now - floor) <= 1e-12 + 1e-6 * floor else "decays along a cosine to"
    return (f"learning rate: continues from {now:.3g} at step {f.step}{scaled} and {way} {floor:.3g} by "
            f"train.steps={t.steps}; no new warmup (train.schedule_from)")


def check_resume_compatible(spec: TrainSpec, run_dir: str) -> ResumePlan:
    """Compare `spec` with the run recorded in `run_dir` before anything starts; see the module docstring.

    Reads only files (no Ray, no torch). A run directory without `spec.yaml`, or without a
    checkpoint, starts at step 0 (`resume_step` None).

    Raises:
        ResumeMismatch: a field the checkpoint cannot carry changed (exit 2); nothing was written.
    """
    plan = ResumePlan(run_dir)
    old = _recorded(run_dir)
    if old is None:
        return plan
    has_ckpt, step = _checkpoint_step(run_dir)
    new_flat = _flatten(spec.model_dump(mode="json"))
    old_flat = _flatten(old)
    changed = sorted(p for p in set(new_flat) | set(old_flat)
                     if new_flat.get(p, None) != old_flat.get(p, None) and p not in ("name", "kind")
                     and not _under(p, "train.schedule_from"))  # raybig's own record, carried over
    plan.changed = changed
    if not has_ckpt:
        if changed:
            plan.notes.append(f"{run_dir} has no checkpoint yet: starting at step 0 with the new spec")
        return plan
    bad = [(p, why) for p in changed if (why := _reason(p, spec)) is not None]
    if bad:
        shown = ", ".join(f"{p} ({_short(old_flat.get(p))} -> {_short(new_flat.get(p))})" for p, _ in bad[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise ResumeMismatch(
            f"{run_dir} holds a checkpoint of run {spec.name!r} that this spec cannot resume: {shown}{more} "
            f"changed ({bad[0][1]}); give the run a new `name`, or start a new run from its weights with "
            f"`init_from: {run_dir}` (nothing was started)")
    plan.resume_step = step
    at = f"step {step}" if step is not None else "its latest checkpoint"
    if step is not None and step >= spec.train.steps and export_of(run_dir):
        plan.complete = True
        plan.notes.append(f"{spec.name!r} is complete: its checkpoint is at step {step} of train.steps="
                          f"{spec.train.steps}; nothing to train (raise train.steps to train further)")
        try:
            plan.result = TrainResult.from_run_dir(run_dir)
        except Exception:  # noqa: BLE001 - no readable metrics: still complete, with what is known
            plan.result = TrainResult(name=spec.name, run_dir=run_dir, steps=step, export_dir=export_of(run_dir))
        plan.result.resumed_from_step = step
        return plan
    what = f"; changed: {', '.join(changed)}" if changed else ""
    plan.notes.append(f"resuming {spec.name!r} from {at} in {run_dir}{what}")
    if step is not None:
        old_train = _old_train(old, spec)
        plan.schedule_from = continued_schedule(old_train, spec.train, step)
        if "train.steps" in changed and plan.schedule_from is not None:
            plan.notes.append(_schedule_note(old_train, spec, plan.schedule_from))
    if "init_from" in changed or (spec.init_from and has_ckpt):
        plan.notes.append("init_from is not used: the run resumes from its own checkpoint")
    return plan
