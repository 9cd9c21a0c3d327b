"""One small runner per spec kind; the CLI and the cluster entrypoint both call `run_spec`."""

from __future__ import annotations

from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)


def run_spec(spec: Any, address: str | None = None, resume_from: str | None = None, as_json: bool = False,
             python_path: list[str] | None = None, verbose: bool = False) -> dict[str, Any] | None:
    if spec.kind == "train":
        from raybig.train.progress import run_train_with_progress

        return run_train_with_progress(spec, address=address, resume_from=resume_from, quiet=as_json,
                                       python_path=python_path, verbose=verbose)
    if spec.kind == "probe":
        from raybig.scheduler.probe import run_probe

        return run_probe(spec, address=address)
    if spec.kind == "sweep":
        from raybig.tune import run_sweep

        return run_sweep(spec, address=address, python_path=python_path, quiet=as_json, verbose=verbose)
    if spec.kind == "serve":
        from raybig.serve.local import run_serve

        return run_serve(spec, address, as_json)
    if spec.kind == "pipeline":
        from raybig.pipeline import run_pipeline

        return run_pipeline(spec, address, python_path, quiet=as_json)
    raise NotImplementedError(f"kind {spec.kind!r} has no runner yet")
