"""Driver side of a sweep: the Tuner (or its restore), ASHA / Optuna, and the results at the end.

Layout of `<storage>/<sweep name>/`:
  sweep.yaml, sweep.json   the frozen sweep spec and its hash (a re-run with another spec is refused)
  tune/                    Ray Tune's experiment (what `Tuner.restore` resumes)
  trials/<trial>/          one Train run per trial (see raybig.tune.trial)
  status.json              Tune's view of every trial (running / terminated / error)
  trials.json, trials.md   the results table; curves.png the validation curves
  best.yaml, best.json     the winner's full train spec and its checkpoint / export URIs
  mlflow.json              the sweep's parent MLflow run (with `tracking.mlflow`; see raybig.tune.trial)
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ray.tune import Callback

from raybig import storage
from raybig.errors import SweepMismatch
from raybig.spec import changed_paths, freeze, spec_hash
from raybig.spec.sweep import SweepSpec
from raybig.train.progress import RunHooks
from raybig.tune.trial import (
    MLFLOW_JSON,
    MLFLOW_RUN_KEY,
    TRIAL_JSON,
    TRIALS_DIR,
    read_json,
    run_trial,
    trial_name,
)

TUNE_DIR = "tune"
STATUS = "status.json"
# Where trial lines go while `run_sweep` runs (the caller's `RunHooks.note`). A module global, not an
# attribute of the callback: Tune pickles its callbacks into the experiment and restores them.
_note: Callable[[str], None] | None = None


def sweep_dir_of(spec: SweepSpec) -> str:
    """`<storage.path>/<name>`: the sweep's directory."""
    return storage.join(spec.storage.path, spec.name)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space for the search (with algorithm grid, choice axes are grid axes too)."""
    from ray import tune

    out: dict[str, Any] = {}
    for path, d in spec.search.items():
        k = d.kind
        v: Any = getattr(d, k)  # the one key given (not None)
        if k == "uniform":
            out[path] = tune.uniform(*v)
        elif k == "loguniform":
            out[path] = tune.loguniform(*v)
        elif k == "randint":
            out[path] = tune.randint(v[0], v[1] + 1)  # ours includes high
        elif k == "choice" and spec.algorithm == "grid":  # grid tries every listed value
            out[path] = tune.grid_search(list(v))
        elif k == "choice":
            out[path] = tune.choice(list(v))
        elif k == "grid":
            out[path] = tune.grid_search(list(v))
        else:
            out[path] = v
    return out


def _search_alg(spec: SweepSpec) -> Any:
    if spec.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.seed))
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Concurrency is this generator's own setting; TuneConfig.max_concurrent_trials only limits Searchers.
    return BasicVariantGenerator(max_concurrent=spec.max_concurrent_trials, random_state=spec.seed)


def _scheduler(spec: SweepSpec) -> Any:
    if spec.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # time_attr is the step (or token) count every report carries, not Tune's report counter.
    return ASHAScheduler(time_attr="step" if spec.time_attr == "steps" else "tokens", max_t=spec.horizon(),
                         grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)


def _tune_samples(spec: SweepSpec) -> int:
    if spec.algorithm == "optuna":
        return spec.total_trials()
    return spec.total_trials() // spec.grid_size()  # Tune crosses every sample with the whole grid


def _say(text: str) -> None:
    if _note is not None:
        _note(text)


class StatusCallback(Callback):
    """Tune callback (driver side): keeps `status.json` and notes one line per finished trial."""

    def __init__(self, sweep_dir: str, quiet: bool = True, mlflow: tuple[str, str] | None = None):
        self.uri = f"{sweep_dir}/{STATUS}"
        self.sweep_dir = sweep_dir
        self.mlflow = mlflow  # (tracking_uri, experiment): close the child runs of trials Tune ended

    def _close_child(self, trial: Any, status: str) -> None:
        """End a trial's MLflow child run that its own process could not end (ASHA stop, crash)."""
        if self.mlflow is None:
            return
        info = read_json(storage.join(self.sweep_dir, TRIALS_DIR, trial_name(trial.trial_id), TRIAL_JSON), {}) or {}
        run_id = info.get(MLFLOW_RUN_KEY)
        if not run_id:
            return
        from raybig.train.tracking import MlflowTracker

        t = MlflowTracker(*self.mlflow, rank=0)
        t.run_id = run_id

        def close() -> None:
            if t.client.get_run(run_id).info.status == "RUNNING":
                t.client.set_terminated(run_id, status)

        t._guard("closing a trial's run", close)

    def _set(self, trial: Any, state: str, **extra: Any) -> None:
        # Re-read every time: after Tuner.restore this object is unpickled with stale state.
        try:
            status: dict[str, Any] = json.loads(storage.read_text(self.uri))
        except (FileNotFoundError, OSError, ValueError):
            status = {}
        status[trial_name(trial.trial_id)] = {"trial_id": trial.trial_id, "state": state,
                                              "config": dict(trial.config), **extra}
        storage.write_text(self.uri, json.dumps(status, indent=2))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Mark the trial running."""
        self._set(trial, "running")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Mark the trial terminated and note its last step and val_loss."""
        last = trial.last_result or {}
        self._set(trial, "terminated", step=last.get("step"))
        self._close_child(trial, "KILLED")  # stopped early by ASHA: its process ended without a word
        _say(f"trial {trial_name(trial.trial_id)} done at step {last.get('step')}: "
             f"val_loss {last.get('val_loss', float('nan')):.4f}  {_short(trial.config)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Mark the trial failed and note it."""
        self._set(trial, "error")
        self._close_child(trial, "FAILED")
        _say(f"trial {trial_name(trial.trial_id)} failed  {_short(trial.config)}")


def _metrics_callback(spec: SweepSpec) -> Any:
    """Prometheus: trials by state, best metric so far (raybig.metrics)."""
    from raybig.tune.metrics_callback import SweepMetricsCallback

    return SweepMetricsCallback(spec.name, spec.metric, spec.mode)


def _short(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def _check_same_sweep(spec: SweepSpec, sweep_dir: str) -> None:
    """Refuse to resume `sweep_dir` with another spec (one line naming what changed); record this one.

    Raises:
        SweepMismatch: the directory holds a sweep with another spec hash (exit 2).
    """
    import yaml

    uri = f"{sweep_dir}/sweep.json"
    h = spec_hash(spec)
    if storage.exists(uri):
        old = json.loads(storage.read_text(uri)).get("spec_hash")
        if old != h:
            changed: list[str] = []
            with contextlib.suppress(Exception):  # an unreadable sweep.yaml: say it differs, not how
                before = yaml.safe_load(storage.read_text(f"{sweep_dir}/sweep.yaml"))
                changed = changed_paths(before, spec.model_dump(mode="json"))
            what = f" ({', '.join(changed[:4])}{' and more' if len(changed) > 4 else ''} changed)" if changed else ""
            raise SweepMismatch(f"{sweep_dir} holds sweep {spec.name!r} run with another spec{what}; a sweep "
                                f"resumes only unchanged: give this one a new name, or remove that directory "
                                f"(nothing was started)")
    storage.write_text(f"{sweep_dir}/sweep.yaml", freeze(spec))
    storage.write_text(uri, json.dumps({"name": spec.name, "kind": spec.kind, "spec_hash": h}, indent=2))


def build_tuner(spec: SweepSpec, sweep_dir: str, python_path: list[str]) -> tuple[Any, bool]:
    """(Tuner, restored). An interrupted sweep in `sweep_dir` is restored, not started again."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=spec, sweep_dir=sweep_dir, python_path=python_path),
        {"CPU": 0.01})  # the trial driver only waits on its TorchTrainer; zero is refused
    spath, sfs = storage.ray_storage(sweep_dir)
    exp_path = f"{spath.rstrip('/')}/{TUNE_DIR}"
    if tune.Tuner.can_restore(exp_path, storage_filesystem=sfs):
        # Finished, stopped and failed trials stay as they are; unfinished ones resume from their
        # latest Train checkpoint (same trial id -> same Train run name).
        return tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False, storage_filesystem=sfs), True
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=_tune_samples(spec),
                                    max_concurrent_trials=(spec.max_concurrent_trials
                                                           if spec.algorithm == "optuna" else None),
                                    search_alg=_search_alg(spec), scheduler=_scheduler(spec)),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=spath, storage_filesystem=sfs,
                                  failure_config=tune.FailureConfig(max_failures=spec.trial_failures),
                                  callbacks=[StatusCallback(sweep_dir, mlflow=_mlflow_of(spec)),
                                             _metrics_callback(spec)], verbose=0),
    )
    return tuner, False


def _mlflow_of(spec: SweepSpec) -> tuple[str, str] | None:
    ml = spec.mlflow()
    return (ml.tracking_uri, ml.experiment) if ml is not None else None


def start_parent_run(spec: SweepSpec, sweep_dir: str) -> Any:
    """The sweep's parent MLflow run (started, or the one a resumed sweep made), or None untracked.

    Params: the frozen sweep spec (secrets as `${VAR}`). Its id goes to `<sweep_dir>/mlflow.json`,
    where every trial finds it. Never raises once the store was checked (`check_tracking_uri`).
    """
    ml = spec.mlflow()
    if ml is None:
        return None
    from raybig.train.tracking import MlflowTracker

    tracker = MlflowTracker(ml.tracking_uri, ml.experiment, run_name=spec.name, rank=0,
                            tags={"raybig.kind": "sweep", "raybig.name": spec.name, "raybig.run_dir": sweep_dir})
    old = (read_json(f"{sweep_dir}/{MLFLOW_JSON}", {}) or {}).get("run_id")
    if old:  # a resumed sweep: the same parent, running again
        tracker.run_id = old
        tracker._guard("resuming the sweep's run", lambda: tracker.client.update_run(old, status="RUNNING"))
        return tracker
    if tracker.start(freeze(spec)):
        storage.write_text(f"{sweep_dir}/{MLFLOW_JSON}", json.dumps({"run_id": tracker.run_id}, indent=2))
    return tracker


def end_parent_run(tracker: Any, report: dict[str, Any] | None, status: str = "FINISHED") -> None:
    """Log the winner (`best_metric`, tag `raybig.best_trial`) on the parent run and end it."""
    if tracker is None:
        return
    best = (report or {}).get("best")
    if best is not None and best.get("metric") is not None:
        tracker.log_metrics({"best_metric": best["metric"]}, 0)
        tracker._guard("tagging the winner",
                       lambda: tracker.client.set_tag(tracker.run_id, "raybig.best_trial", best["trial"]))
    tracker.end(status)


@contextlib.contextmanager
def pinned_ray_address() -> Iterator[None]:
    """Give every trial (and what it starts) RAY_ADDRESS = this cluster, while the Tuner runs.

    When an ASHA-stopped trial's Train controller dies, a detached PlacementGroupCleaner frees its
    workers. It finds the cluster through the State API with no address, which fails with "Found
    multiple active Ray instances" whenever another Ray runs on the machine, and then the next
    trial waits forever for workers. Tune passes a fixed list of env vars to trial actors; RAY_ADDRESS
    is added to it here, and the controller and the cleaner inherit it from the trial.
    """
    import os

    import ray
    from ray.tune.execution import class_cache

    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if not isinstance(names, set):  # a Ray without this hook: nothing to pin
        yield
        return
    old = os.environ.get("RAY_ADDRESS")
    added = "RAY_ADDRESS" not in names
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    names.add("RAY_ADDRESS")
    try:
        yield
    finally:
        if added:
            names.discard("RAY_ADDRESS")
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old


def run_sweep(spec: SweepSpec, address: str | None = None, python_path: list[str] | None = None,
              verbose: bool = False, on_tuner: Callable[[Any], None] | None = None,
              hooks: RunHooks | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep to the end; write and return its report.

    Prints nothing itself: a start line, one line per finished trial and an interruption go to
    `hooks.note`; the caller shows the returned report (the CLI: `raybig.cli.progress.print_report`).

    Raises:
        SweepMismatch: the sweep's directory holds a run of another spec (before Ray starts).
        KeyboardInterrupt: the sweep was interrupted (run the same spec again to resume it).
    """
    global _note
    import os

    from raybig.cluster.ray_env import check_gang_fits, ensure_ray
    from raybig.tune.report import write_report

    hooks = hooks or RunHooks()
    sweep_dir = sweep_dir_of(spec)
    _check_same_sweep(spec, sweep_dir)  # before Ray starts: a changed spec costs nothing
    if (ml := spec.mlflow()) is not None:  # an unreachable store: TrackingError (exit 2), before Ray
        from raybig.train.tracking import check_tracking_uri

        check_tracking_uri(ml.tracking_uri)
    b = spec.base.resources
    # The dashboard must be on: Train's placement-group cleaner uses the State API, and without it
    # the workers of an ASHA-stopped trial are never given back (the next trial hangs).
    ensure_ray(address, num_cpus=b.workers * b.cpus_per_worker * spec.max_concurrent_trials + 1,
               dashboard=True, use_gpu=b.gpus_per_worker > 0, verbose=verbose)
    check_gang_fits(spec.base.worker_bundle(), b.workers, f"sweep {spec.name!r}")
    tuner, restored = build_tuner(spec, sweep_dir, python_path or [os.getcwd()])
    hooks.note(f"{'resuming' if restored else 'starting'} sweep {spec.name!r}: {spec.total_trials()} trials, "
               f"{spec.algorithm}, scheduler {spec.scheduler} -> {sweep_dir}")
    if on_tuner:
        on_tuner(tuner)
    # Tune prints its own tables on stdout; stdout is kept for our result (`--json`).
    parent = start_parent_run(spec, sweep_dir)
    _note = hooks.note
    try:
        with pinned_ray_address(), contextlib.redirect_stdout(sys.stderr):
            tuner.fit()  # Tune catches Ctrl-C itself: it stops the trials, saves its state and returns
    except BaseException:
        end_parent_run(parent, None, "FAILED")
        raise
    finally:
        _note = None
    report = write_report(sweep_dir, final=True)
    if report["counts"]["interrupted"] or len(report["trials"]) < spec.total_trials():
        end_parent_run(parent, report, "KILLED")
        hooks.note(f"sweep interrupted: run the same spec again to resume it "
                   f"({report['counts']['interrupted']} trials resume from their last checkpoint)")
        raise KeyboardInterrupt
    end_parent_run(parent, report)
    return report
