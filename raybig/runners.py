"""One runner per spec kind; the CLI (`raybig run`) and the cluster entrypoint both call `run_spec`.

Runners return typed results and never print: what a person sees comes from the `RunHooks` the
caller passes (the CLI's draw a progress bar; the default shows nothing).
"""

from __future__ import annotations

from typing import Any

from raybig.errors import UsageError
from raybig.spec.job import JobSpec
from raybig.spec.models import TrainSpec
from raybig.spec.pipeline import PipelineSpec
from raybig.spec.probe import ProbeSpec
from raybig.spec.serve import ServeSpec
from raybig.spec.sweep import SweepSpec
from raybig.train.progress import RunHooks
from raybig.train.result import TrainResult

RunResult = TrainResult | dict[str, Any]


def run_spec(spec: JobSpec, address: str | None = None, resume_from: str | None = None,
             python_path: list[str] | None = None, verbose: bool = False,
             hooks: RunHooks | None = None) -> RunResult:
    """Run `spec` to completion (serve: until Ctrl-C) and return its result.

    Args:
        spec: a validated spec of any kind (`raybig.spec.JobSpec`).
        address: Ray cluster to attach to; None: RAY_ADDRESS, else an embedded local Ray.
        resume_from: checkpoint URI a train run starts from (train only).
        python_path: folders plug-in models import from (the working directory, the spec's folder).
        verbose: show Ray's and the workers' logs.
        hooks: progress callbacks (`RunHooks`); None shows nothing.

    Returns:
        train: `TrainResult`; sweep: the sweep report dict; serve: the server's address info;
        pipeline: the per-stage state; probe: what the probe held.

    Raises:
        TrainingFailed, SweepMismatch, ServeError, PipelineFailed, ClusterError (all `RaybigError`),
        UsageError for an option the kind does not take, KeyboardInterrupt on Ctrl-C.
    """
    from raybig.spec.paths_resolve import absolute, resolve_paths

    hooks = hooks or RunHooks()
    # Relative paths (data, init_from, storage, checkpoints, model folders) resolve against the working
    # directory, here in the driver, for every kind: workers and trials run in folders of their own.
    spec, _ = resolve_paths(spec)
    resume_from = absolute(resume_from) if resume_from else None
    if resume_from and not isinstance(spec, TrainSpec):
        raise UsageError(f"--resume-from applies to train specs, not kind {spec.kind!r}")
    match spec:
        case TrainSpec():
            from raybig.train.compat import check_resume_compatible
            from raybig.train.preflight import preflight_run
            from raybig.train.runner import run_dir_of, run_train

            # Before the progress bar and Ray: a spec its run's checkpoint cannot carry fails here (exit 2).
            plan = check_resume_compatible(spec, run_dir_of(spec))
            for line in plan.notes:
                hooks.note(line)
            if plan.result is not None:  # already complete: nothing to start
                return plan.result
            preflight_run(spec, resume_from)  # what no worker-group restart can fix: one line, exit 2
            with hooks.train(spec) as on_metrics:
                res = run_train(spec, address=address, resume_from=resume_from, on_metrics=on_metrics,
                                python_path=python_path, verbose=verbose, sample=True, on_note=hooks.note)
            if spec.eval is not None and spec.eval.at_end:  # the spec's `eval:` section, on the export
                from raybig.eval.run import evaluate_after_training

                evaluate_after_training(spec, res, note=hooks.note)
            return res
        case ProbeSpec():
            from raybig.scheduler.probe import run_probe

            return run_probe(spec, address=address)
        case SweepSpec():
            from raybig.tune import run_sweep

            return run_sweep(spec, address=address, python_path=python_path, verbose=verbose, hooks=hooks)
        case ServeSpec():
            from raybig.serve.local import run_serve

            return run_serve(spec, address, on_ready=hooks.serving, on_note=hooks.note)
        case PipelineSpec():
            from raybig.pipeline import run_pipeline

            return run_pipeline(spec, address, python_path, hooks=hooks)
        case _:
            raise UsageError(f"kind {getattr(spec, 'kind', '?')!r} has no runner")
