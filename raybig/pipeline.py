"""Run a `kind: pipeline`: sweep -> train the winner -> serve, with a durable per-stage status.

`<storage>/<name>/pipeline.json` records each stage (pending/running/finished/failed, its output).
Running the same spec again skips finished stages; a failed stage stops the pipeline and says which.
"""

from __future__ import annotations

import json
import time
from typing import Any

from raybig import storage
from raybig.errors import PipelineFailed, first_line
from raybig.spec.models import StorageSpec, TrainSpec
from raybig.spec.pipeline import PipelineSpec
from raybig.spec.yaml_io import load_yaml_text
from raybig.train.progress import RunHooks

STAGES = ("sweep", "train", "serve")


def pipeline_dir(spec: PipelineSpec) -> str:
    """`<storage.path>/<name>`: the pipeline's state file and every stage's outputs."""
    return storage.join(spec.storage.path, spec.name)


def read_state(spec: PipelineSpec) -> dict[str, Any]:
    """`pipeline.json`: each stage's status (pending/running/finished/failed/interrupted) and outputs."""
    uri = f"{pipeline_dir(spec)}/pipeline.json"
    if storage.exists(uri):
        return json.loads(storage.read_text(uri))
    return {"name": spec.name, "stages": {s: {"status": "pending"} for s in STAGES}}


def _save(spec: PipelineSpec, state: dict[str, Any]) -> None:
    storage.write_text(f"{pipeline_dir(spec)}/pipeline.json", json.dumps(state, indent=2))


def _sweep(spec: PipelineSpec, address: str | None, python_path: list[str] | None, hooks: RunHooks) -> dict:
    from raybig.tune import run_sweep

    sweep = spec.sweep.model_copy(update={"storage": StorageSpec(path=pipeline_dir(spec))})
    report = run_sweep(sweep, address=address, python_path=python_path, hooks=hooks)
    if not report.get("best"):
        raise RuntimeError("no trial finished with a metric; nothing to train")
    best = report["best"]
    hooks.note(f"sweep {sweep.name!r}: {len(report['trials'])} trials; best {best['trial']} "
               f"{report['metric']}={best['metric']:.4f}")
    return {"best_spec": report["best"]["spec"], "best_trial": report["best"]["trial"],
            "metric": report["best"]["metric"]}


def _train(spec: PipelineSpec, best_spec: str, address: str | None, python_path: list[str] | None,
           hooks: RunHooks) -> dict:
    from raybig.train.runner import run_train

    # best.yaml says `${VAR}` for secrets: read it as a spec file is read, so they resolve (and stay secret).
    best = load_yaml_text(storage.read_text(best_spec), source=best_spec).data
    train = TrainSpec.model_validate(spec.train_stage_data(best, pipeline_dir(spec)))
    from raybig.train.compat import check_resume_compatible
    from raybig.train.runner import run_dir_of

    for line in check_resume_compatible(train, run_dir_of(train)).notes:  # run_train checks it again
        hooks.note(line)
    with hooks.train(train) as on_metrics:
        res = run_train(train, address=address, on_metrics=on_metrics, python_path=python_path)
    if not res.export_dir:
        raise RuntimeError("training finished without an export")
    return {"run_dir": res.run_dir, "export": res.export_dir}


def run_pipeline(spec: PipelineSpec, address: str | None = None, python_path: list[str] | None = None,
                 hooks: RunHooks | None = None, block: bool = True) -> dict[str, Any]:
    """Run the stages not yet finished; serve the result (until Ctrl-C when `block`).

    Args:
        spec: the pipeline.
        address: Ray cluster to attach to; None: RAY_ADDRESS, else an embedded local Ray.
        python_path: folders plug-in models import from.
        hooks: progress callbacks (train bar, notes, serving banner); None shows nothing.
        block: serve in this process until Ctrl-C; False starts the app and returns.

    Returns:
        The pipeline state (`read_state`'s shape), every stage finished.

    Raises:
        PipelineFailed: a stage failed (named in the message; earlier stages stay finished).
    """
    from raybig.serve.local import run_serve, start_serve

    hooks = hooks or RunHooks()
    state = read_state(spec)
    st = state["stages"]
    for stage in STAGES:
        if st[stage].get("status") == "finished" and stage != "serve":
            hooks.note(f"skip {stage}: finished earlier")
            continue
        st[stage] = {"status": "running", "started": time.time()}
        _save(spec, state)
        try:
            if stage == "sweep":
                out = _sweep(spec, address, python_path, hooks)
            elif stage == "train":
                out = _train(spec, st["sweep"]["best_spec"], address, python_path, hooks)
            else:
                serve_spec = spec.serve_spec(st["train"]["export"])
                out = {"checkpoint": serve_spec.checkpoint}
                if not block:
                    out.update(start_serve(serve_spec, address))
        except (Exception, KeyboardInterrupt) as e:
            st[stage] = {"status": "failed" if not isinstance(e, KeyboardInterrupt) else "interrupted",
                         "error": first_line(e)}
            _save(spec, state)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise PipelineFailed(f"pipeline {spec.name!r}: stage {stage!r} failed: {st[stage]['error']} "
                                 f"(earlier stages are kept; fix it and run the same spec again)") from None
        st[stage] = {"status": "finished", "finished": time.time(), **out}
        _save(spec, state)
    if block:
        run_serve(spec.serve_spec(st["train"]["export"]), address, on_ready=hooks.serving, on_note=hooks.note)
    return state

