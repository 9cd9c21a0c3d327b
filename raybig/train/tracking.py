"""Experiment tracking in MLflow from rank 0; a tracking outage never fails training.

- `check_tracking_uri(uri)`: driver/validate-time check that the store can be reached (one-line
  `TrackingError`), so a job is refused before any worker starts.
- `MlflowTracker`: one MLflow run of a train job (or, with `parent_run_id`, a sweep trial's nested
  child run): params from the resolved spec, metrics per step, the export folder as artifacts.
  Ranks other than 0 get a tracker that does nothing. The first failed call logs one warning and
  disables the tracker; every later call is a no-op.
- `train_callback(tracker)`: a Ray Train v2 `UserCallback` that logs rank 0's reports from the
  Train controller, so the worker loop needs no tracking code at all.
- `sweep_callback(...)`: Ray Tune's own `MLflowLoggerCallback` with every trial nested under a parent
  run, guarded the same way.

Why not Ray's `setup_mlflow` for the train side: in Ray 2.60 it calls `mlflow.start_run` (process-
global active-run state), logs the config with no flattening, and raises if the server is down; it
offers no degrade-on-failure. Its one extra, rank-0 gating, is `ray.train.get_context()`, which
`MlflowTracker` uses too. For Tune, `MLflowLoggerCallback` already does what a sweep needs (one run per
trial, config as params, every reported result as metrics, on the driver), and an MLflow parent is a
tag (`mlflow.parentRunId`), so `sweep_callback` only adds the parent tag and the guard.

Secrets: log only the frozen spec (where secret values are still `${VAR}`) that the caller passes;
nothing here reads the environment into params.
"""

from __future__ import annotations

import logging
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from raybig.errors import TrackingError, first_line

log = logging.getLogger(__name__)

__all__ = ["PARENT_TAG", "MlflowTracker", "TrackingError", "check_tracking_uri", "flatten_params",
           "sweep_callback", "train_callback"]

PARENT_TAG = "mlflow.parentRunId"
"""MLflow's tag that makes a run a nested child of another (what `mlflow.start_run(nested=True)` sets)."""

MAX_PARAM_CHARS = 6000
"""MLflow's limit on one param value (longer ones are cut, with a trailing `...`)."""


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Raise `TrackingError` (one line) unless the MLflow tracking store at `uri` looks usable.

    - `file:///abs/dir` or a plain path: the directory exists and is writable, or can be created.
    - `sqlite:///abs/file.db`: its directory exists and is writable.
    - `http(s)://host:port[/prefix]`: `GET <uri>/health` answers 200 within `timeout_s` seconds
      (the endpoint every `mlflow server` serves).
    - `databricks...`: accepted without a check (credentials come from the environment).

    Raises:
        TrackingError: anything else, or the check failed.
    """
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme
    if scheme in ("", "file"):
        path = urllib.parse.unquote(parsed.path) if scheme == "file" else uri
        probe = path
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe.rstrip("/"))
        if not probe or not os.path.isdir(probe) or not os.access(probe, os.W_OK):
            raise TrackingError(f"tracking_uri {uri!r}: {path!r} is not a writable directory")
        return
    if scheme == "sqlite":
        d = os.path.dirname(urllib.parse.unquote(parsed.path)) or "."
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise TrackingError(f"tracking_uri {uri!r}: directory {d!r} does not exist or is not writable")
        return
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - scheme checked above
                if r.status != 200:
                    raise TrackingError(f"tracking_uri {uri!r}: /health answered HTTP {r.status}")
        except urllib.error.HTTPError as e:
            raise TrackingError(f"tracking_uri {uri!r}: /health answered HTTP {e.code}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"tracking_uri {uri!r} cannot be reached: {reason}") from None
        return
    if scheme.startswith("databricks"):
        return
    raise TrackingError(f"tracking_uri {uri!r}: unsupported scheme {scheme!r} "
                        "(use file:///dir, sqlite:///file.db or http(s)://host:port)")


def flatten_params(tree: Mapping[str, Any] | str, sep: str = ".") -> dict[str, str]:
    """A nested spec (dict, or its YAML text) as flat `a.b.0.c -> str(value)` params.

    Values longer than `MAX_PARAM_CHARS` are cut. `None` becomes "null". Never raises: text that is
    not a YAML mapping gives `{"spec": text}`.
    """
    if isinstance(tree, str):
        import yaml

        try:
            loaded = yaml.safe_load(tree)
        except yaml.YAMLError:
            loaded = None
        if not isinstance(loaded, Mapping):
            return {"spec": tree[:MAX_PARAM_CHARS]}
        tree = loaded
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                walk(v, f"{key}{sep}{k}" if key else str(k))
        elif isinstance(node, (list, tuple)) and node:
            for i, v in enumerate(node):
                walk(v, f"{key}{sep}{i}" if key else str(i))  # MLflow keys allow no brackets
        else:
            text = "null" if node is None else str(node)
            if len(text) > MAX_PARAM_CHARS:
                text = text[:MAX_PARAM_CHARS - 3] + "..."
            out[key] = text

    walk(tree, "")
    return out


def _prepare_env(uri: str, http_timeout_s: int = 5, http_retries: int = 0) -> None:
    # Defaults only: a user's own MLFLOW_* settings win.
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("", "file"):
        # MLflow >= 3.7 refuses the file store unless opted in; a file:// URI in a spec is that opt-in.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    elif scheme in ("http", "https"):
        # MLflow's defaults retry for minutes (7 tries, backoff 2, 120 s timeout): one stalled step
        # of a few seconds, then the tracker turns itself off.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(http_timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(http_retries))


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue  # MLflow metrics are numbers; strings/dicts/None are not logged
        if math.isfinite(v):
            out[str(k)] = float(v)
    return out


def _ray_train_rank() -> int:
    try:
        import ray.train

        return int(ray.train.get_context().get_world_rank())
    except Exception:  # not inside a Ray Train worker: a driver or plain process is rank 0
        return 0


class MlflowTracker:
    """One MLflow run, logged from rank 0 only; failures disable it with one warning.

    Args:
        tracking_uri: `file:///abs/dir`, `sqlite:///abs/file.db` or `http(s)://host:port`.
        experiment: experiment name (created if missing).
        run_name: the run's display name (MLflow picks one when None).
        tags: extra string tags.
        parent_run_id: nest this run under that one (a sweep's trial under the sweep's run).
        rank: this process's rank; None asks Ray Train (0 outside a Train worker). Non-zero: no-op.
        http_timeout_s, http_retries: for http(s) stores, so an outage stalls a step for seconds, not
            MLflow's default minutes of retries (set as MLflow's env defaults; a user's env wins).
            A `file:` URI sets `MLFLOW_ALLOW_FILE_STORE=true` the same way (MLflow >= 3.7 refuses the
            file store without it); `sqlite:///abs/mlflow.db` is the serverless store MLflow prefers.

    Use `start(params)`, `log_metrics(metrics, step)`, `log_artifacts(dir)`, `end()`, or `with tracker:`
    (ends FINISHED, or FAILED if the block raised). Properties: `enabled`, `run_id`.
    """

    def __init__(self, tracking_uri: str, experiment: str = "raybig", *, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
                 rank: int | None = None, http_timeout_s: int = 5, http_retries: int = 0):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.run_name, self.tags = run_name, dict(tags or {})
        self.parent_run_id = parent_run_id
        self.rank = _ray_train_rank() if rank is None else rank
        self.enabled = self.rank == 0
        self.run_id: str | None = None
        self._client: Any = None
        self._warned = False
        if self.enabled:
            _prepare_env(tracking_uri, http_timeout_s, http_retries)

    @property
    def client(self) -> Any:
        """The `MlflowClient` (made on first use, so a pickled tracker rebuilds it where it lands)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            _prepare_env(self.tracking_uri)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}  # clients hold sessions; rebuild on the other side

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - tracking must never fail training
            self.enabled = False
            if not self._warned:
                self._warned = True
                log.warning("MLflow tracking disabled for the rest of this run: %s failed: %s",
                            what, first_line(e))
            return None

    def start(self, params: Mapping[str, Any] | str | None = None) -> str | None:
        """Create the run (and the experiment if needed) and log `params`; returns the run id or None.

        `params`: the frozen spec as a nested dict or YAML text (flattened with `flatten_params`),
        or an already flat dict. The YAML text, when given, is also stored as artifact `spec.yaml`.
        """
        def go() -> str:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                try:
                    exp_id = self.client.create_experiment(self.experiment)
                except Exception:  # created concurrently by another tracker: use that one
                    exp = self.client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            tags = dict(self.tags)
            if self.parent_run_id:
                tags[PARENT_TAG] = self.parent_run_id
            run = self.client.create_run(exp_id, run_name=self.run_name, tags=tags)
            return str(run.info.run_id)

        self.run_id = self._guard("starting the run", go)
        if params is not None:
            self.log_params(params)
            if isinstance(params, str):
                self._guard("logging spec.yaml", lambda: self.client.log_text(self.run_id, params, "spec.yaml"))
        return self.run_id

    def log_params(self, params: Mapping[str, Any] | str) -> None:
        """Log params (flattened; see `start`) in batches of 100 (MLflow's per-request limit)."""
        from mlflow.entities import Param

        flat = flatten_params(params)

        def go() -> None:
            items = [Param(k, v) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])

        self._guard("logging params", go)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the finite numeric entries of `metrics` at `step`, in one request; others are skipped."""
        from mlflow.entities import Metric

        values = _finite_metrics(metrics)
        if not values or not self.enabled:
            return

        def go() -> None:
            import time

            ts = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, int(step)) for k, v in values.items()])

        self._guard("logging metrics", go)

    def log_artifacts(self, local_dir: str, artifact_path: str = "export") -> None:
        """Upload every file under `local_dir` (e.g. the export folder) to `artifact_path` in the run."""
        self._guard("logging artifacts", lambda: self.client.log_artifacts(self.run_id, local_dir, artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        """End the run: status FINISHED, FAILED or KILLED."""
        if self.run_id is not None:
            self._guard("ending the run", lambda: self.client.set_terminated(self.run_id, status))

    def child(self, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> MlflowTracker:
        """A tracker for a nested child run of this one (same store and experiment; not started)."""
        t = MlflowTracker(self.tracking_uri, self.experiment, run_name=run_name, tags=tags,
                          parent_run_id=self.run_id, rank=self.rank)
        t.enabled = self.enabled and self.run_id is not None
        return t

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")


def sweep_callback(tracking_uri: str, experiment: str, parent_run_id: str | None,
                   tags: Mapping[str, str] | None = None, save_artifact: bool = False) -> Any:
    """Ray Tune's `MLflowLoggerCallback`, each trial's run nested under `parent_run_id`, never raising.

    Pass it in `tune.RunConfig(callbacks=[...])` on the driver; create the parent with an
    `MlflowTracker` first (`parent.start(sweep_spec)`; `parent.run_id`). A failure logs one warning
    and turns the callback into a no-op; the sweep goes on.
    """
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class _Guarded(MLflowLoggerCallback):
        _off = False

        def _safe(self, what: str, fn: Callable[..., Any], *a: Any) -> None:
            if self._off:
                return
            try:
                fn(*a)
            except Exception as e:  # noqa: BLE001 - tracking must never fail the sweep
                self._off = True
                log.warning("MLflow sweep tracking disabled: %s failed: %s", what, first_line(e))

        def setup(self, *args: Any, **kwargs: Any) -> None:
            self._safe("setup", super().setup, *args)

        def log_trial_start(self, trial: Any) -> None:
            self._safe("trial start", super().log_trial_start, trial)

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            self._safe("trial result", super().log_trial_result, iteration, trial, result)

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            self._safe("trial end", super().log_trial_end, trial, failed)

    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    _prepare_env(tracking_uri)
    return _Guarded(tracking_uri, experiment_name=experiment, tags=all_tags, save_artifact=save_artifact)


def train_callback(tracker: MlflowTracker) -> Any:
    """A Ray Train v2 `UserCallback` that logs rank 0's reports to `tracker`'s (started) run.

    Train v2 runs it on its controller, not on the workers: the worker loop needs no tracking code.
    Pass it in `ray.train.RunConfig(callbacks=[...])`; the tracker is pickled there (its client is
    rebuilt) and logs `metrics[0]` at `metrics[0]["step"]` after every report. Start the run (params)
    on the driver before `fit()`; after it, log the export and `end()` there too (Train v2's
    callbacks have no end-of-run hook in Ray 2.60). Never raises (see `MlflowTracker`).
    """
    from ray.train.v2.api.callback import UserCallback

    class _Tracking(UserCallback):
        def __init__(self, t: MlflowTracker):
            self.tracker = t

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                self.tracker.log_metrics(metrics[0], int(metrics[0].get("step", 0)))

    return _Tracking(tracker)


# --------------------------------------------------------------------------- a train run's tracking

MLFLOW_RUN_KEY = "mlflow_run_id"
"""run.json key holding the MLflow run id of a tracked train run (evaluation logs to the same run)."""


class RunTracking:
    """The driver's side of a train run's tracking; does nothing when the spec has no `tracking.mlflow`.

    `run_train` calls `for_spec` before Ray starts (an unreachable store is a `TrackingError`, exit 2,
    and nothing starts), `start` once the run directory is written (params: the frozen spec, whose
    secret values are still `${VAR}`; the spec text as artifact `spec.yaml`; the run id goes into
    run.json), `log` with every record rank 0 reports (on the driver's progress thread, so a slow or
    dead store never stalls a worker), then `finish` (the export as artifacts, status FINISHED) or
    `fail`. Every call is guarded by `MlflowTracker`: the first failure logs one warning and turns
    tracking off; training goes on.
    """

    def __init__(self, tracker: MlflowTracker | None = None, log_export: bool = True):
        self.tracker, self.log_export = tracker, log_export

    @classmethod
    def for_spec(cls, spec: Any) -> RunTracking:
        """The tracking a train spec asks for, its store checked now.

        Raises:
            TrackingError: the store cannot be reached or written (exit 2).
        """
        t = getattr(spec, "tracking", None)
        m = t.mlflow if t is not None else None
        if m is None:
            return cls()
        check_tracking_uri(m.tracking_uri)
        return cls(MlflowTracker(m.tracking_uri, m.experiment, run_name=spec.name,
                                 tags={"raybig.kind": "train", "raybig.name": spec.name}, rank=0), m.log_export)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once started (None: no tracking, or the store failed)."""
        return self.tracker.run_id if self.tracker is not None else None

    def start(self, spec: Any, run_dir: str) -> None:
        """Create the MLflow run with the frozen spec as params; note its id in `<run_dir>/run.json`."""
        if self.tracker is None:
            return
        from raybig.spec import freeze

        self.tracker.tags["raybig.run_dir"] = run_dir
        run_id = self.tracker.start(freeze(spec))
        if run_id is not None:
            _note_run_id(run_dir, run_id)

    def log(self, metrics: Mapping[str, Any]) -> None:
        """Log one reported record (its numeric values) at its `step`."""
        if self.tracker is not None and self.tracker.enabled:
            self.tracker.log_metrics(metrics, int(metrics.get("step", 0) or 0))

    def finish(self, export_dir: str | None) -> None:
        """Upload the export (a local folder) as artifacts `export/`, then end the run FINISHED."""
        if self.tracker is None:
            return
        if export_dir and self.log_export:
            from raybig import storage

            if storage.is_local(export_dir):
                self.tracker.log_artifacts(storage.normalize(export_dir), "export")
            else:
                log.warning("MLflow: export %s is not local; not uploaded as artifacts", export_dir)
        self.tracker.end("FINISHED")

    def fail(self, status: str = "FAILED") -> None:
        """End the run FAILED (or KILLED for an interrupt)."""
        if self.tracker is not None:
            self.tracker.end(status)


def _note_run_id(run_dir: str, run_id: str) -> None:
    import json

    from raybig import storage
    from raybig.train.result import RUN_FILE

    uri = storage.join(run_dir, RUN_FILE)
    try:
        data = json.loads(storage.read_text(uri)) if storage.exists(uri) else {}
        data[MLFLOW_RUN_KEY] = run_id
        storage.write_text(uri, json.dumps(data, indent=2, default=str))
    except (OSError, ValueError) as e:  # bookkeeping only: never fail the run for it
        log.warning("could not note the MLflow run id in %s: %s", uri, first_line(e))


def log_to_run(spec: Any, run_dir: str, metrics: Mapping[str, Any], step: int) -> bool:
    """Log `metrics` at `step` into the MLflow run a tracked train run made (its id in run.json).

    For results that come after training (`raybig eval`, the spec's `eval:` section). Returns
    whether anything was logged; never raises (no tracking, no run id, a store gone away: False).
    """
    import json

    from raybig import storage
    from raybig.train.result import RUN_FILE

    t = getattr(spec, "tracking", None)
    m = t.mlflow if t is not None else None
    if m is None:
        return False
    try:
        run_id = json.loads(storage.read_text(storage.join(run_dir, RUN_FILE))).get(MLFLOW_RUN_KEY)
    except (OSError, ValueError):
        return False
    if not run_id:
        return False
    tracker = MlflowTracker(m.tracking_uri, m.experiment, rank=0)
    tracker.run_id = run_id
    tracker.log_metrics(metrics, step)
    return tracker.enabled
