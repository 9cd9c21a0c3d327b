"""`raybig sweep report RUN`: the results table, curves and winner of a sweep, on demand."""

from __future__ import annotations

import json
import os

import click

from raybig.cli.app import main, out
from raybig.cli.progress import print_report
from raybig.errors import UsageError


@main.group()
def sweep() -> None:
    """Inspect hyperparameter sweeps."""


@sweep.command()
@click.argument("run", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def report(run: str, as_json: bool) -> None:
    """Table, curves.png and best.yaml for a sweep directory (or a sweep spec file)."""
    from raybig import storage
    from raybig.tune.report import write_report

    sweep_dir = run
    if run.endswith((".yaml", ".yml")) and os.path.isfile(run):
        from raybig.spec import load_spec

        spec = load_spec(run)
        if spec.kind != "sweep":
            raise UsageError(f"{run} is a {spec.kind!r} spec, not a sweep")
        sweep_dir = storage.join(spec.storage.path, spec.name)
    if not storage.exists(f"{storage.normalize(sweep_dir)}/sweep.yaml"):
        raise UsageError(f"{sweep_dir}: not a sweep directory (no sweep.yaml)")
    rep = write_report(sweep_dir)
    if as_json:
        out.print_json(json.dumps(rep, default=str))
    else:
        print_report(rep)


