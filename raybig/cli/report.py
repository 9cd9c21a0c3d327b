"""`raybig report RUN`: plots (PNG) and a text summary of a train run, or a sweep's trial curves."""

from __future__ import annotations

import json
import os

import click

from raybig.cli import main, out
from raybig.errors import RaybigError


@main.command("report")
@click.argument("run", metavar="RUN")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Where to write the report (default: <run_dir>/report).")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard event files to <out>/tensorboard.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def report_cmd(run: str, out_dir: str | None, tensorboard: bool, as_json: bool) -> None:
    """Plots of loss/val_loss, learning rate and tokens/s vs step for RUN (a run directory, or the
    spec file that produced it), plus a short summary. For a sweep: its trial curves and table."""
    from raybig import storage
    from raybig.report import ReportError, report

    run_dir = run
    if run.endswith((".yaml", ".yml")) and os.path.isfile(run):
        from raybig.spec import load_spec

        spec = load_spec(run)  # SpecError -> exit 2 with path + line
        if not hasattr(spec, "storage"):
            raise RaybigError(f"{run} is a {spec.kind!r} spec; it has no run directory to report on", 2)
        run_dir = storage.join(spec.storage.path, spec.name)
    try:
        rep = report(run_dir, out_dir, tensorboard)
    except ReportError as e:
        raise RaybigError(str(e), 2) from None
    if as_json:
        out.print_json(json.dumps(rep.to_json(), default=str))
        return
    for line in rep.summary:
        out.print(line)
    for f in rep.files:
        out.print(f"wrote {f}")
