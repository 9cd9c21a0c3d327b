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
from raybig.errors import EXIT_FAILED, RaybigError, SpecError
from raybig.spec import load_spec

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


VERBOSE_KEY = "raybig.verbose"  # ctx.meta: print tracebacks (`raybig --verbose`, `run --verbose`)


def verbose_wanted(ctx: click.Context | None = None) -> bool:
    """Whether failures print their traceback: `raybig --verbose`, `run --verbose` or RAYBIG_VERBOSE=1."""
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(VERBOSE_KEY)) or os.environ.get("RAYBIG_VERBOSE") == "1"


def _traceback(ctx: click.Context) -> None:
    if verbose_wanted(ctx):
        import traceback

        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()


class RaybigGroup(click.Group):
    """Turns every failure into one line and its exit code; `--verbose` adds the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; a RaybigError becomes one `error ...` line and its exit code.

        Anything else unexpected is one `error internal error: ...` line (exit 1), Ctrl-C one
        `interrupted` line (exit 130); with `--verbose` the traceback comes first. While the command
        runs, `raybig.cli.interrupt` makes sure a Ctrl-C ends it promptly whatever it waits on.
        """
        from raybig.cli.interrupt import interrupt_guard

        if ctx.params.get("verbose"):
            ctx.meta[VERBOSE_KEY] = True
        try:
            with interrupt_guard(console):
                return super().invoke(ctx)
        except SpecError as e:
            _traceback(ctx)
            for issue in e.issues:
                console.print(f"[red]error[/red] {escape(issue.render())}", soft_wrap=True)
            n = len(e.issues)
            console.print(f"{n} problem{'s' if n != 1 else ''} in the spec; nothing was started.")
            sys.exit(e.exit_code)
        except RaybigError as e:
            _traceback(ctx)
            console.print(f"[red]error[/red] {escape(str(e))}", soft_wrap=True)
            sys.exit(e.exit_code)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors, --help, explicit exits: click prints them
        except KeyboardInterrupt:
            _traceback(ctx)
            from raybig.cli.interrupt import exit_interrupted

            exit_interrupted(console)
        except Exception as e:  # noqa: BLE001 - the edge: every failure is one line
            _traceback(ctx)
            from raybig.errors import first_line

            hint = "" if verbose_wanted(ctx) else " (`raybig --verbose ...` shows the traceback)"
            console.print(f"[red]error[/red] internal error: {escape(first_line(e))}{hint}", soft_wrap=True)
            sys.exit(EXIT_FAILED)


set_option = click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
                          help="Override a spec value, e.g. --set train.lr=1e-3 (repeatable).")


@click.group(cls=RaybigGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="raybig")
@click.option("--verbose", is_flag=True, help="On a failure, print the traceback too (default: one line).")
def main(verbose: bool) -> None:
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
@click.option("--resume-from", default=None, metavar="URI",
              help="Also check that this checkpoint can be resumed (world size, completeness).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate(spec_path: str, overrides: tuple[str, ...], resume_from: str | None, as_json: bool) -> None:
    """Check a spec and print its memory estimate; starts nothing.

    A train spec also goes through the checks `raybig run` makes before Ray starts: the run's recorded
    spec (`raybig.train.compat`) and the data and checkpoint preflight (`raybig.train.preflight`: a glob
    that matches nothing, a corpus too small for one sequence per worker, a checkpoint from another
    world size). Each failure is the same one line and exit code as `run`'s.
    """
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
    try:
        notes = _run_checks(spec, resume_from)
    except RaybigError as e:
        if not as_json:
            raise
        print(json.dumps({"ok": False, "spec": spec_path, "error": str(e), "exit_code": e.exit_code}, indent=2),
              file=out.file)
        sys.exit(e.exit_code)
    summary = validate_summary(spec)
    summary["lines"] = [*summary.get("lines", []), *notes]
    if as_json:
        print(json.dumps({"ok": True, **summary}, indent=2), file=out.file)
    else:
        out.print(f"[green]ok[/green] {spec_path}: {summary['kind']} {summary['name']!r}")
        for line in summary.get("lines", []):
            out.print(f"  {line}", markup=False)
        for line in summary.get("warnings", []):
            console.print(f"[yellow]warning[/yellow] {escape(line)}", soft_wrap=True)


def _run_checks(spec: Any, resume_from: str | None) -> list[str]:
    """What `raybig run` checks of a train spec before Ray starts; returns the resume notes.

    Raises:
        ResumeMismatch, PreflightError, UsageError (exit 2), IncompleteCheckpointError (exit 1):
            exactly as `raybig run` would, before anything starts.
    """
    from raybig.spec.models import TrainSpec

    if not isinstance(spec, TrainSpec):
        return []
    from raybig.errors import UsageError
    from raybig.spec.paths_resolve import absolute, resolve_paths
    from raybig.storage import exists, join
    from raybig.train.compat import check_resume_compatible
    from raybig.train.preflight import preflight_run

    spec, _ = resolve_paths(spec)  # as the driver does: relative paths against this directory
    resume_from = absolute(resume_from) if resume_from else None
    if resume_from:
        try:
            found = exists(resume_from)
        except Exception:  # noqa: BLE001 - e.g. credentials only the workers have
            found = True
        if not found:
            raise UsageError(f"--resume-from {resume_from}: no such checkpoint")
    plan = check_resume_compatible(spec, join(spec.storage.path, spec.name))
    if plan.result is None:
        preflight_run(spec, resume_from)
    return list(plan.notes)


@main.command()
@click.argument("spec_path", metavar="SPEC")
@set_option
@click.option("--address", default=None, help="Ray cluster to run on (default: embedded local Ray).")
@click.option("--resume-from", default=None, metavar="URI", help="Start from this checkpoint (any fsspec URI).")
@click.option("--json", "as_json", is_flag=True, help="Print the final result as JSON.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show Ray and worker logs (and tracebacks, as `raybig --verbose`).")
def run(spec_path: str, overrides: tuple[str, ...], address: str | None, resume_from: str | None,
        as_json: bool, verbose: bool) -> None:
    """Run a spec to completion on an embedded local Ray (or --address)."""
    if verbose:
        click.get_current_context().meta[VERBOSE_KEY] = True  # tracebacks too, as `raybig --verbose`
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
        from raybig.cli.interrupt import exit_interrupted

        exit_interrupted(console, "interrupted: workers stopped; the last checkpoint is kept and `raybig run` on "
                                  "the same spec resumes from it.")
    if as_json:
        out.print_json(json.dumps(result.to_json() if isinstance(result, TrainResult) else result, default=str))
    elif isinstance(result, TrainResult):
        print_train_summary(console, result)
    elif spec.kind == "sweep" and isinstance(result, dict):
        from raybig.cli.progress import print_report

        print_report(result)
