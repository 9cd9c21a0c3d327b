"""One sweep trial: a Tune function trainable that builds and fits a Ray Train v2 TorchTrainer.

Train v2 refuses `Tuner(TorchTrainer)`, so each trial is a small driver function (given 0.01 CPU by
the runner) that validates its own train spec and fits it. Metrics reach Tune through a
`TuneReportCallback` subclass that runs in the Train controller.

Files per trial, under `<sweep dir>/trials/<trial name>/` (also the Train run dir):
  trial.json   params, state (running / finished / failed), error, how often it started
  curve.jsonl  every report Tune saw (val_loss carried forward; `fresh` marks a new evaluation)
  spec.yaml    the trial's resolved train spec; export/ and checkpoint_*/ from Train
  eval.json    the base spec's `eval:` section, run on the trial's export when it finishes

A sweep metric named `eval.<result>` comes from that evaluation: it runs here, in the trial, after
fit() returns, and its results join the trial's last report (`eval.perplexity`, ...), which is what
Tune and the sweep's report rank trials by.

MLflow (`tracking.mlflow` on the sweep or its base): each trial is a child run nested under the
sweep's parent run (`<sweep dir>/mlflow.json`): params = the trial's overrides (`search.<path>`) and
its resolved spec (secrets frozen as `${VAR}`), metrics = every record rank 0 reports at its step
(through a Ray queue to this trial's driver, as `raybig run` does), then the evaluation and
`final_metric` at the last step.
A tracking store that fails turns tracking off for that trial with one warning; the trial goes on.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from raybig import storage
from raybig.errors import first_line
from raybig.spec.models import TrainSpec
from raybig.train.result import dedupe_steps

TRIALS_DIR = "trials"
CURVE = "curve.jsonl"
TRIAL_JSON = "trial.json"
MLFLOW_JSON = "mlflow.json"
"""`<sweep dir>/mlflow.json`: `{"run_id"}` of the sweep's parent MLflow run."""
MLFLOW_RUN_KEY = "mlflow_run_id"
"""trial.json key holding the trial's child run id (a restarted trial keeps logging into it)."""


def trial_name(trial_id: str) -> str:
    """`trial_<id>`: the trial's directory and Train run name."""
    # Stable across Tuner.restore (trial ids are restored), so a resumed trial's Train run resumes too.
    return f"trial_{trial_id}"


def read_json(uri: str, default: Any = None) -> Any:
    """JSON at `uri`, or `default` when it is missing or unreadable."""
    try:
        return json.loads(storage.read_text(uri))
    except (FileNotFoundError, OSError, ValueError):
        return default


def read_curve(trial_dir: str) -> list[dict[str, Any]]:
    """Reports by step (a restarted trial re-reports steps after its checkpoint: last one wins)."""
    try:
        text = storage.read_text(f"{trial_dir}/{CURVE}")
    except (FileNotFoundError, OSError):
        return []
    return dedupe_steps(json.loads(line) for line in text.splitlines() if line.strip())


class SweepReportCallback(TuneReportCallback):
    """Forwards rank 0's reports to Tune, filling the gaps ASHA and best-result selection would trip on.

    Our loop reports `val_loss` only at eval steps. Every forwarded result carries the most recent
    val_loss (and the sweep metric) forward, with `val_step` saying where it was measured; the runner
    also puts an evaluation on every ASHA rung, so rung decisions use a fresh value. `tokens` is filled
    in for the step-0 report. A result is held back until the metric has been seen once, because
    Tune refuses results without it.
    """

    def __init__(self, trial_dir: str, metric: str, tokens_per_step: int, last_step: int):
        super().__init__()
        self.trial_dir, self.metric, self.tokens_per_step = trial_dir, metric, tokens_per_step
        self.last_step = last_step
        self.carry: dict[str, Any] | None = None

    def _load_carry(self) -> dict[str, Any]:
        carry: dict[str, Any] = {}
        for r in read_curve(self.trial_dir):  # after a restart, pick up where the curve left off
            for k in {"val_loss", "val_step", self.metric}:
                if k in r:
                    carry[k] = r[k]
        return carry

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Forward rank 0's report to Tune with val_loss carried forward (held back until it exists)."""
        if self.carry is None:
            self.carry = self._load_carry()
        m = dict(metrics[0])
        fresh = "val_loss" in m
        if fresh:
            m["val_step"] = m["step"]
        for k in {"val_loss", "val_step", self.metric}:
            if k in m:
                self.carry[k] = m[k]
            elif k in self.carry:
                m[k] = self.carry[k]
        m.setdefault("tokens", int(m["step"]) * self.tokens_per_step)
        if checkpoint:
            m["checkpoint_path"] = checkpoint.path
        record = {**m, "fresh": fresh, "time": time.time()}
        fs, path = storage.fs_for(f"{self.trial_dir}/{CURVE}")
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        # The last report is held back: ASHA stops a trial that reaches max_t (or loses at the top
        # rung) at once, which would kill it while it still writes its export. The trial function
        # reports it to Tune itself once fit() has returned.
        if self.metric in m and int(m["step"]) < self.last_step:
            self._training_actor_item_queue.put(m)


def run_trial(config: dict[str, Any], sweep: Any, sweep_dir: str, python_path: list[str]) -> None:
    """The Tune trainable. `config` holds the sampled values, keyed by dotted train spec path."""
    import ray.tune

    from raybig.spec.sweep import trial_spec
    from raybig.train.runner import build_trainer, write_run_record

    trial_id = ray.tune.get_context().get_trial_id()
    name = trial_name(trial_id)
    root = storage.join(sweep_dir, TRIALS_DIR)
    tdir = f"{root}/{name}"
    info_uri = f"{tdir}/{TRIAL_JSON}"
    info = read_json(info_uri, {}) or {}
    info.update({"trial_id": trial_id, "name": name, "params": dict(config), "state": "running",
                 "starts": int(info.get("starts", 0)) + 1, "error": None})
    storage.write_text(info_uri, json.dumps(info, indent=2))
    tracker = None
    try:
        spec = _align_eval(trial_spec(sweep, dict(config), name, root), sweep)
        write_run_record(spec, tdir)
        tracker = trial_tracker(sweep, sweep_dir, spec, dict(config), info)
        if tracker is not None and tracker.run_id:
            info[MLFLOW_RUN_KEY] = tracker.run_id
            storage.write_text(info_uri, json.dumps(info, indent=2))
        cb = SweepReportCallback(tdir, sweep.metric, spec.tokens_per_step(), last_step=spec.train.steps)
        with _pump_to(tracker) as queue:
            build_trainer(spec, queue, callbacks=[cb], name=name, storage_path=root, python_path=python_path).fit()
        evaluated = evaluate_trial(spec, tdir, sweep.metric)
    except BaseException as e:
        info.update(state="failed", error=one_line(e))
        storage.write_text(info_uri, json.dumps(info, indent=2))
        if tracker is not None:
            tracker.end("FAILED")
        raise
    info["state"] = "finished"
    storage.write_text(info_uri, json.dumps(info, indent=2))
    final = [r for r in read_curve(tdir) if int(r["step"]) >= spec.train.steps]
    last = {**final[-1], **evaluated} if final else dict(evaluated)
    if evaluated and final:  # the evaluation joins the last report (curve.jsonl merges it by step)
        _append_curve(tdir, {**last, "fresh": False, "time": time.time()})
    if tracker is not None:
        step = int(last.get("step", spec.train.steps))
        tracker.log_metrics({**evaluated, **({"final_metric": last[sweep.metric]} if sweep.metric in last else {})},
                            step)
        tracker.end("FINISHED")
    if final and sweep.metric in last:
        ray.tune.report({k: v for k, v in last.items() if k not in ("fresh", "time")})


@contextlib.contextmanager
def _pump_to(tracker: Any) -> Iterator[Any]:
    """A Ray queue for rank 0's records, drained into `tracker` by a thread here; None without a tracker."""
    if tracker is None:
        yield None
        return
    import threading

    from ray.util.queue import Empty, Queue

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    stop = threading.Event()

    def pump() -> None:
        while True:
            try:
                if stop.is_set() and queue.empty():
                    return
                m = queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor gone: nothing more to log
                return
            m.pop("_t", None)
            tracker.log_metrics(m, int(m.get("step", 0) or 0))  # never raises

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join(timeout=10)
        with contextlib.suppress(Exception):
            queue.shutdown()


def _append_curve(trial_dir: str, record: dict[str, Any]) -> None:
    fs, path = storage.fs_for(f"{trial_dir}/{CURVE}")
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate_trial(spec: TrainSpec, trial_dir: str, metric: str) -> dict[str, float]:
    """The base spec's end-of-training `eval:` on the trial's export, as sweep metric names (`eval.<...>`).

    Writes `<trial_dir>/eval.json`. Returns {} when the spec has no `eval:` that runs at the end.

    Raises:
        EvalFailed: the evaluation failed and the sweep's metric is one of its results (the trial
            could not be ranked); otherwise a failed evaluation leaves the trial's training result.
    """
    if spec.eval is None or not spec.eval.at_end:
        return {}
    from raybig.errors import EvalFailed, RaybigError
    from raybig.eval.run import evaluate_run
    from raybig.spec.sweep import eval_metric_name

    try:
        rep = evaluate_run(spec, trial_dir)
    except RaybigError as e:
        if metric.startswith("eval."):
            raise EvalFailed(f"end-of-training evaluation (the sweep's metric {metric}) failed: {e}") from None
        import logging

        logging.getLogger(__name__).warning("trial %s: evaluation failed: %s", spec.name, e)
        return {}
    out = {eval_metric_name(k): v for k, v in rep.flat().items()}
    if metric.startswith("eval.") and metric not in out:
        raise EvalFailed(f"the evaluation did not produce the sweep's metric {metric} (it gave {sorted(out)})")
    return out


def trial_tracker(sweep: Any, sweep_dir: str, spec: TrainSpec, params: dict[str, Any],
                  info: dict[str, Any]) -> Any:
    """The trial's MLflow child run (started, params logged), or None when the sweep is not tracked.

    A restarted trial (its id in trial.json) logs into the same child run again.
    """
    ml = sweep.mlflow()
    if ml is None:
        return None
    from raybig.spec import freeze
    from raybig.train.tracking import MlflowTracker, flatten_params

    parent = (read_json(f"{sweep_dir}/{MLFLOW_JSON}", {}) or {}).get("run_id")
    tracker = MlflowTracker(ml.tracking_uri, ml.experiment, run_name=spec.name, parent_run_id=parent, rank=0,
                            tags={"raybig.kind": "sweep-trial", "raybig.sweep": sweep.name,
                                  "raybig.sweep_metric": sweep.metric, "raybig.run_dir": storage.join(spec.storage.path, spec.name)})
    if info.get(MLFLOW_RUN_KEY):
        tracker.run_id = info[MLFLOW_RUN_KEY]
        return tracker
    tracker.start(freeze(spec))  # the resolved spec: secret-sourced values stay ${VAR}
    tracker.log_params({f"search.{k}": v for k, v in flatten_params(params, sep=".").items()})
    return tracker


def one_line(e: BaseException) -> str:
    """The root cause in one line: Train wraps worker errors (and their tracebacks) in its own."""
    import re

    text = str(e).strip()
    causes = re.findall(r"^\s*([A-Za-z_.]*(?:Error|Exception): .+)$", text, re.MULTILINE)
    return f"{type(e).__name__}: {causes[-1].strip()[:300]}" if causes else first_line(e)[:300]


def _align_eval(spec: TrainSpec, sweep: Any) -> TrainSpec:
    """Evaluate on every ASHA rung (multiples of grace_period steps), so rungs compare fresh values."""
    import math

    if sweep.scheduler != "asha" or sweep.time_attr != "steps" or sweep.metric != "val_loss":
        return spec
    every = math.gcd(spec.train.eval_every, sweep.grace_period)
    if every == spec.train.eval_every:
        return spec
    from raybig.spec.paths import edit

    return edit(spec, {"train.eval_every": every})  # keeps secret-sourced values' origin
