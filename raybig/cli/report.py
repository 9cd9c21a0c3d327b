"""`raybig report RUN`: plots (PNG) and a text summary of a train run, or a sweep's trial curves."""

from __future__ import annotations

import json
import os

import click

from raybig.cli.app import main, out
from raybig.errors import UsageError


@main.command("report")
@click.argument("run", metavar="RUN")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Where to write the report (default: <run_dir>/report).")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard event files to <out>/tensorboard.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def report_cmd(run: str, out_dir: str | None, tensorboard: bool, as_json: bool) -> None:
    """Plots and a short summary of a train run, or a sweep's trial curves and table.

    RUN is a run directory, or the spec file that produced it. Plots: loss/val_loss, learning
    rate and tokens/s against step.
    """
    from raybig import storage
    from raybig.report import report

    run_dir = run
    if run.endswith((".yaml", ".yml")) and os.path.isfile(run):
        from raybig.spec import load_spec

        spec = load_spec(run)  # SpecError -> exit 2 with path + line
        if not hasattr(spec, "storage"):
            raise UsageError(f"{run} is a {spec.kind!r} spec; it has no run directory to report on")
        run_dir = storage.join(spec.storage.path, spec.name)
    rep = report(run_dir, out_dir, tensorboard)  # ReportError: exit 2
    if as_json:
        out.print_json(json.dumps(rep.to_json(), default=str))
        return
    for line in rep.summary:
        out.print(line)
    for f in rep.files:
        out.print(f"wrote {f}")
