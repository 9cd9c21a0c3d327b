"""Run a `kind: pipeline`: sweep -> train the winner -> serve, with a durable per-stage status.

`<storage>/<name>/pipeline.json` records each stage (pending/running/finished/failed, its output).
Running the same spec again skips finished stages; a failed stage stops the pipeline and says which.
"""

from __future__ import annotations

import json
import time
from typing import Any

import yaml
from rich.console import Console

from raybig import storage
from raybig.errors import PipelineFailed
from raybig.spec.models import StorageSpec, TrainSpec
from raybig.spec.pipeline import PipelineSpec, apply_set

console = Console(stderr=True, highlight=False)
STAGES = ("sweep", "train", "serve")


def pipeline_dir(spec: PipelineSpec) -> str:
    return storage.join(spec.storage.path, spec.name)


def read_state(spec: PipelineSpec) -> dict[str, Any]:
    uri = f"{pipeline_dir(spec)}/pipeline.json"
    if storage.exists(uri):
        return json.loads(storage.read_text(uri))
    return {"name": spec.name, "stages": {s: {"status": "pending"} for s in STAGES}}


def _save(spec: PipelineSpec, state: dict[str, Any]) -> None:
    storage.write_text(f"{pipeline_dir(spec)}/pipeline.json", json.dumps(state, indent=2))


def _sweep(spec: PipelineSpec, address: str | None, python_path: list[str] | None, quiet: bool) -> dict:
    from raybig.tune import run_sweep

    sweep = spec.sweep.model_copy(update={"storage": StorageSpec(path=pipeline_dir(spec))})
    report = run_sweep(sweep, address=address, python_path=python_path, quiet=quiet)
    if not report.get("best"):
        raise RuntimeError("no trial finished with a metric; nothing to train")
    return {"best_spec": report["best"]["spec"], "best_trial": report["best"]["trial"],
            "metric": report["best"]["metric"]}


def _train(spec: PipelineSpec, best_spec: str, address: str | None, python_path: list[str] | None,
           quiet: bool) -> dict:
    from raybig.train.progress import run_train_with_progress

    data = yaml.safe_load(storage.read_text(best_spec))
    data = apply_set(data, spec.train.set)
    data.update(name=f"{spec.name}-train", storage={"path": pipeline_dir(spec)})
    if spec.train.from_scratch:
        data.pop("init_from", None)
    train = TrainSpec.model_validate(data)
    res = run_train_with_progress(train, address=address, quiet=quiet, python_path=python_path)
    export = (res or {}).get("export_dir")
    if not export:
        raise RuntimeError("training finished without an export")
    return {"run_dir": res["run_dir"], "export": export}


def run_pipeline(spec: PipelineSpec, address: str | None = None, python_path: list[str] | None = None,
                 quiet: bool = False, block: bool = True) -> dict[str, Any]:
    """Run the stages not yet finished; serve the result (until Ctrl-C when `block`)."""
    from raybig.serve.local import run_serve, start_serve

    state = read_state(spec)
    st = state["stages"]
    for stage in STAGES:
        if st[stage].get("status") == "finished" and stage != "serve":
            if not quiet:
                console.print(f"[dim]skip[/dim] {stage}: finished earlier")
            continue
        st[stage] = {"status": "running", "started": time.time()}
        _save(spec, state)
        try:
            if stage == "sweep":
                out = _sweep(spec, address, python_path, quiet)
            elif stage == "train":
                out = _train(spec, st["sweep"]["best_spec"], address, python_path, quiet)
            else:
                serve_spec = spec.serve_spec(st["train"]["export"])
                out = {"checkpoint": serve_spec.checkpoint}
                if not block:
                    out.update(start_serve(serve_spec, address))
        except (Exception, KeyboardInterrupt) as e:
            st[stage] = {"status": "failed" if not isinstance(e, KeyboardInterrupt) else "interrupted",
                         "error": str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}
            _save(spec, state)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise PipelineFailed(f"pipeline {spec.name!r}: stage {stage!r} failed: {st[stage]['error']} "
                                 f"(earlier stages are kept; fix it and run the same spec again)") from None
        st[stage] = {"status": "finished", "finished": time.time(), **out}
        _save(spec, state)
    if block:
        run_serve(spec.serve_spec(st["train"]["export"]), address)
    return state

