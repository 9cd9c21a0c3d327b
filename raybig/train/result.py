"""The one result of a train run, as `raybig run --json`, a submitted job's status and `raybig report` give it.

A `TrainResult` is built by the driver when a run ends (`raybig.train.runner.run_train`) and can be
rebuilt later from the run directory alone (`TrainResult.from_run_dir`): everything in it comes from
files the run wrote (`metrics.jsonl`, `run.json`, Ray's checkpoint registry, `export/`), except the
driver's wall-clock timings and the text sample, which only the run itself knows.
(Modelled on Ray Train's `Result.from_path`.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from raybig import storage
from raybig.errors import ReportError

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
EXPORT_DIR = "export"


def dedupe_steps(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, sorted by step; the last values reported for a step win.

    A step reported again (a resumed run re-reports the steps after its checkpoint) is merged over
    the earlier record. Records without an integer `step` are dropped.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        step = r.get("step") if isinstance(r, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            by_step.setdefault(step, {}).update(r)
    return [by_step[s] for s in sorted(by_step)]


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """`<run_dir>/metrics.jsonl`, one record per step (`dedupe_steps`).

    Raises:
        ReportError: the file is missing, or a line is not JSON (names file and line).
    """
    uri = storage.join(run_dir, METRICS_FILE)
    if not storage.exists(uri):
        raise ReportError(f"{run_dir}: no {METRICS_FILE} (not a finished or running train run?)")
    records = []
    for n, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ReportError(f"{uri}:{n}: not JSON ({e.msg})") from None
    return dedupe_steps(records)


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


@dataclass
class TrainResult:
    """What a train run produced.

    Attributes:
        name: the run's name (the spec's `name`, or a sweep trial's name).
        run_dir: the run directory URI (`<storage.path>/<name>`).
        steps: the last optimizer step recorded.
        metrics: the last value of every metric over the run (records merged in step order).
        history: one metrics record per step (not part of `to_json`).
        checkpoint: URI of the newest checkpoint Ray registered, or None.
        export_dir: URI of the inference export (`<run_dir>/export`), or None.
        resumed_from_step: the step this run (attempt) started after, when it resumed; else None.
        val_loss_first / val_loss_last: first and last validation loss (nats/token), or None.
        seconds: wall time of the run on the driver (s); None when rebuilt from files.
        seconds_to_first_step: driver wall time until step 1 was reported (s); None when unknown.
        sample: text generated from the export (`spec.sample`); None when not made.
        evaluation: the spec's `eval:` section's results at the end of training
            (`raybig.eval.run.EvalReport.to_json()`, or `{"error": ...}`); None when none ran.
        preempted_at_step: the step this attempt checkpointed at and stopped because the scheduler
            preempted it (it resumes from there when admitted again); None when it ran to the end.
    """

    name: str
    run_dir: str
    steps: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    checkpoint: str | None = None
    export_dir: str | None = None
    resumed_from_step: int | None = None
    val_loss_first: float | None = None
    val_loss_last: float | None = None
    seconds: float | None = None
    seconds_to_first_step: float | None = None
    sample: str | None = None
    evaluation: dict[str, Any] | None = None
    preempted_at_step: int | None = None

    @classmethod
    def from_history(cls, name: str, run_dir: str, history: list[dict[str, Any]], **extra: Any) -> TrainResult:
        """Build from per-step records (deduplicated here); `extra` sets the remaining fields."""
        history = dedupe_steps(history)
        merged: dict[str, Any] = {}
        for h in history:
            merged.update(h)
        # An earlier attempt's preemption stays in its own step's record, not in the run's metrics.
        last = history[-1] if history else {}
        merged.pop("preempted_at_step", None)
        if isinstance(last.get("preempted_at_step"), int) and "preempted_at_step" not in extra:
            extra["preempted_at_step"] = last["preempted_at_step"]
        vals = [v for h in history if (v := _finite(h.get("val_loss"))) is not None]
        return cls(name=name, run_dir=run_dir, steps=int(merged.get("step", 0)), metrics=merged,
                   history=history, val_loss_first=vals[0] if vals else None,
                   val_loss_last=vals[-1] if vals else None, **extra)

    @classmethod
    def from_run_dir(cls, run_dir: str) -> TrainResult:
        """Rebuild from a run directory (local path or any fsspec URI); Ray is not needed.

        Raises:
            ReportError: no readable `metrics.jsonl` there.
        """
        from raybig.train.checkpoints import latest_checkpoint

        run_dir = storage.normalize(run_dir)
        history = read_metrics(run_dir)
        name = run_dir.rstrip("/").rsplit("/", 1)[-1]
        run_uri = storage.join(run_dir, RUN_FILE)
        if storage.exists(run_uri):
            try:
                name = json.loads(storage.read_text(run_uri)).get("name") or name
            except ValueError:
                pass
        try:
            ckpt = latest_checkpoint(run_dir)
        except (ValueError, OSError):
            ckpt = None
        restored = [h["restored_step"] for h in history if isinstance(h.get("restored_step"), int)]
        res = cls.from_history(name, run_dir, history, checkpoint=ckpt, export_dir=export_of(run_dir),
                               resumed_from_step=restored[-1] if restored else None)
        # What only the driver knew (timings, the sample), as the last run wrote it into run.json.
        done = _read_run_json(run_dir).get("result") or {}
        if isinstance(done, dict) and done.get("steps") == res.steps:
            for key in ("seconds", "seconds_to_first_step", "sample", "resumed_from_step", "evaluation"):
                if done.get(key) is not None:
                    setattr(res, key, done[key])
        return res

    def to_json(self) -> dict[str, Any]:
        """Every field but `history`, as JSON-ready values."""
        d = asdict(self)
        d.pop("history")
        return d


def _read_run_json(run_dir: str) -> dict[str, Any]:
    uri = storage.join(run_dir, RUN_FILE)
    try:
        data = json.loads(storage.read_text(uri)) if storage.exists(uri) else {}
    except (ValueError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def write_result(run_dir: str, result: TrainResult) -> None:
    """Add `result` to `<run_dir>/run.json` as its `result` (steps, metrics, timings, ...).

    Keeps the name, kind and spec hash written when the run started.
    """
    data = _read_run_json(run_dir)
    data["result"] = result.to_json()
    storage.write_text(storage.join(run_dir, RUN_FILE), json.dumps(data, indent=2, default=str))


def export_of(run_dir: str) -> str | None:
    """`<run_dir>/export` when it holds an export (its config.json), else None."""
    export = storage.join(run_dir, EXPORT_DIR)
    return export if storage.exists(f"{export}/config.json") else None
