"""The `raybig` command line. Thin: parse, call library functions, print."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from raybig import __version__
from raybig.errors import EXIT_INTERRUPTED, RaybigError, SpecError
from raybig.spec import load_spec

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


class RaybigGroup(click.Group):
    """Turns expected failures into one-line messages instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; a RaybigError becomes one `error ...` line and its exit code."""
        try:
            return super().invoke(ctx)
        except SpecError as e:
            for issue in e.issues:
                console.print(f"[red]error[/red] {escape(issue.render())}", soft_wrap=True)
            n = len(e.issues)
            console.print(f"{n} problem{'s' if n != 1 else ''} in the spec; nothing was started.")
            sys.exit(e.exit_code)
        except RaybigError as e:
            console.print(f"[red]error[/red] {escape(str(e))}", soft_wrap=True)
            sys.exit(e.exit_code)


set_option = click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
                          help="Override a spec value, e.g. --set train.lr=1e-3 (repeatable).")


@click.group(cls=RaybigGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="raybig")
def main() -> None:
    """Train, tune and serve GPT-style models with DeepSpeed ZeRO on Ray, from one YAML spec."""


def _load(path: str, overrides: tuple[str, ...]) -> Any:
    from raybig.plugins import add_python_path, target_problems

    # Plug-in models (`model.target`) import from the working directory and the spec's folder.
    add_python_path([os.getcwd(), os.path.dirname(os.path.abspath(path))])
    # A `model.target` whose module, factory or kwargs do not exist is a spec error here, before
    # anything starts (read from the module's source; torch is not imported).
    return load_spec(path, list(overrides), checks=[target_problems])


@main.command()
@click.argument("spec_path", metavar="SPEC")
@set_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate(spec_path: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check a spec and print its memory estimate; starts nothing."""
    from raybig.errors import dotted_path
    from raybig.spec.summary import validate_summary

    try:
        spec = _load(spec_path, overrides)
    except SpecError as e:
        if not as_json:
            raise
        # A script gets JSON on stdout for a bad spec too (and exit 2), one object per issue.
        issues = [{"source": i.source, "line": i.line, "path": dotted_path(i.path), "message": i.message,
                   "text": i.render()} for i in e.issues]
        print(json.dumps({"ok": False, "spec": spec_path, "issues": issues}, indent=2), file=out.file)
        sys.exit(e.exit_code)
    summary = validate_summary(spec)
    if as_json:
        print(json.dumps({"ok": True, **summary}, indent=2), file=out.file)
    else:
        out.print(f"[green]ok[/green] {spec_path}: {summary['kind']} {summary['name']!r}")
        for line in summary.get("lines", []):
            out.print(f"  {line}", markup=False)
        for line in summary.get("warnings", []):
            console.print(f"[yellow]warning[/yellow] {escape(line)}", soft_wrap=True)


@main.command()
@click.argument("spec_path", metavar="SPEC")
@set_option
@click.option("--address", default=None, help="Ray cluster to run on (default: embedded local Ray).")
@click.option("--resume-from", default=None, metavar="URI", help="Start from this checkpoint (any fsspec URI).")
@click.option("--json", "as_json", is_flag=True, help="Print the final result as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show Ray and worker logs.")
def run(spec_path: str, overrides: tuple[str, ...], address: str | None, resume_from: str | None,
        as_json: bool, verbose: bool) -> None:
    """Run a spec to completion on an embedded local Ray (or --address)."""
    from raybig.cli.progress import ConsoleHooks, JsonHooks, print_train_summary
    from raybig.runners import run_spec
    from raybig.train.result import TrainResult

    spec = _load(spec_path, overrides)
    spec_dir = os.path.dirname(os.path.abspath(spec_path))
    hooks = JsonHooks(out) if as_json else ConsoleHooks(console)
    if address is None and not as_json and spec.kind in ("train", "sweep"):
        from raybig.spec.summary import validate_summary

        for line in validate_summary(spec).get("warnings", []):  # e.g. more memory than this machine has
            console.print(f"[yellow]warning[/yellow] {escape(line)}", soft_wrap=True)
    try:
        result = run_spec(spec, address=address, resume_from=resume_from, python_path=[os.getcwd(), spec_dir],
                          verbose=verbose, hooks=hooks)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: workers stopped; the last checkpoint is kept and "
                      "`raybig run` on the same spec resumes from it.")
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        out.print_json(json.dumps(result.to_json() if isinstance(result, TrainResult) else result, default=str))
    elif isinstance(result, TrainResult):
        print_train_summary(console, result)
    elif spec.kind == "sweep" and isinstance(result, dict):
        from raybig.cli.sweep import print_report

        print_report(result)


if __name__ == "__main__":  # pragma: no cover
    main()
from raybig.cli import (  # noqa: E402  (command modules register themselves on `main`; add yours here)
    export,  # noqa: F401  (export)
    jobs,  # noqa: F401  (submit, status, logs, stop, list, queue, cluster)
    report,  # noqa: F401  (report)
    serve,  # noqa: F401  (serve status, serve down)
    sweep,  # noqa: F401  (sweep report)
)
