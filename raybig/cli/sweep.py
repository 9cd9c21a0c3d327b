"""`raybig sweep report RUN`: the results table, curves and winner of a sweep, on demand."""

from __future__ import annotations

import json
import os
from typing import Any

import click
from rich.console import Console

from raybig.cli import main, out
from raybig.cli.progress import print_whole, whole_table
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


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """A sweep report (`raybig.tune.report.write_report`) as a table, the winner and the curves' path."""
    con = console or out
    recs = report["trials"]
    keys = list(recs[0]["params"]) if recs else []
    headers = ["#", "trial", *keys, "state", "steps", f"{report['metric']} (last)", "best"]
    rows = [[str(i), r["trial"], *[_fmt(r["params"].get(k, "")) for k in keys], r["state"], str(r["steps"]),
             _fmt(r["metric"]) if r["metric"] is not None else "-", _fmt(r["best"]) if r["best"] is not None else "-"]
            for i, r in enumerate(recs, 1)]
    print_whole(con, whole_table(headers, rows, f"sweep {report['sweep']}: {len(recs)} trials, "
                                                f"{report['total_steps']} steps in all"))
    b = report.get("best")
    if b:
        con.print(f"best: {b['trial']} {report['metric']}={b['metric']:.4f}  checkpoint {b['checkpoint']}",
                  soft_wrap=True, markup=False)
        con.print(f"winner spec: {b['spec']}  (raybig run {b['spec']})", soft_wrap=True, markup=False)
    con.print(f"curves: {report.get('curves')}", soft_wrap=True, markup=False)
