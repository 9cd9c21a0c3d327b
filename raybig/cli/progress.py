"""The terminal side of `raybig run`: progress bar, final summary, and tables that stay whole.

`whole_table` and `print_whole` keep ids, numbers and paths whole at 80 columns (any command's table).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from raybig.spec.models import TrainSpec
from raybig.train.progress import MetricsCallback, RunHooks
from raybig.train.result import TrainResult


class ConsoleHooks(RunHooks):
    """RunHooks that draw on `console` (stderr): a bar per train run, notes, the serving banner."""

    quiet = False

    def __init__(self, console: Console):
        self.console = console

    @contextlib.contextmanager
    def train(self, spec: TrainSpec) -> Iterator[MetricsCallback | None]:
        """A progress bar over `spec.train.steps` while the run lasts; yields its update callback."""
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=self.console, transient=False)
        with progress:
            task = progress.add_task(spec.name, total=spec.train.steps, info="starting Ray + DeepSpeed...")

            def on_metrics(m: dict[str, Any]) -> None:
                info = []
                if "loss" in m:
                    info.append(f"loss {m['loss']:.3f}")
                if "val_loss" in m:
                    info.append(f"val {m['val_loss']:.3f}")
                if "tokens_per_s" in m:
                    info.append(f"{m['tokens_per_s']:,.0f} tok/s")
                progress.update(task, completed=m.get("step", 0), info=" ".join(info) or "step 0")

            yield on_metrics

    def note(self, text: str) -> None:
        """Print `text` as is (long lines run on rather than break a path or an id)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def serving(self, info: dict[str, Any]) -> None:
        """Print where the app serves and how to call it."""
        self.console.print(f"[green]serving[/green] {info['name']!r} at {info['url']} "
                           f"(OpenAI-compatible: POST /completions, GET /models); Ctrl-C stops it")
        if info.get("api_key_env"):
            self.console.print(f"  API key: the value of ${info['api_key_env']}")


def print_train_summary(console: Console, r: TrainResult) -> None:
    """The few lines `raybig run` prints when a train run ends."""
    m = r.metrics
    if r.seconds is None:  # nothing ran: the run was already complete (raybig.train.compat)
        console.print(f"[green]complete[/green] {r.name}: {r.steps} steps (finished earlier; nothing was run)")
    else:
        first = f" (first step after {r.seconds_to_first_step}s)" if r.seconds_to_first_step is not None else ""
        resumed = f", resumed from step {r.resumed_from_step}" if r.resumed_from_step else ""
        console.print(f"[green]done[/green] {r.name}: {r.steps} steps in {r.seconds}s{first}{resumed}")
    if r.val_loss_first is not None and r.val_loss_last is not None:
        console.print(f"  val_loss {r.val_loss_first:.3f} -> {r.val_loss_last:.3f}")
    if "tokens_per_s" in m:
        console.print(f"  {m['tokens_per_s']:,.0f} tokens/s, step {m.get('step_time_s', 0) * 1000:.0f} ms, "
                      f"peak mem {m.get('peak_mem_bytes', 0) / 2**20:,.0f} MiB/worker")
    console.print(f"  run dir: {r.run_dir}", soft_wrap=True, markup=False)
    if r.checkpoint:
        console.print(f"  checkpoint: {r.checkpoint}", soft_wrap=True, markup=False)
    if r.export_dir:
        console.print(f"  export: {r.export_dir}", soft_wrap=True, markup=False)
    if r.sample:
        console.print("  sample:", style="bold")
        console.print(r.sample, markup=False)


class JsonHooks(RunHooks):
    """RunHooks for `--json`: silent, except a serving app's address as one JSON line when it is up."""

    quiet = True

    def __init__(self, out: Console):
        self.out = out

    def serving(self, info: dict[str, Any]) -> None:
        """Print `info` as one JSON line on stdout."""
        import json

        print(json.dumps(info), file=self.out.file, flush=True)  # flushed: a supervisor may wait on it


def whole_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> Any:
    """A rich Table whose cells are never cut or folded.

    Each column is at least as wide as its longest cell, so at 80 columns (a pipe, a CI log) ids,
    numbers and paths stay whole and the line runs long instead (print it with `print_whole`).
    """
    from rich.table import Table

    t = Table(title=title, box=None, pad_edge=False, title_justify="left")
    for c, h in enumerate(headers):
        width = max([len(h), *(len(r[c]) for r in rows)])
        t.add_column(h, no_wrap=True, min_width=width, overflow="ignore")
    for r in rows:
        t.add_row(*r)
    return t


def print_whole(console: Console, table: Any) -> None:
    """Print `table` at its natural width, even wider than the console (lines run long, nothing is cut)."""
    width = console.measure(table, options=console.options.update(width=10_000)).maximum
    if width <= console.width:
        console.print(table)
        return
    # Rich fits a table to its console's width (dropping columns that do not fit): print this one
    # through a console as wide as the table, on the same stream.
    wide = Console(file=console.file, width=width, highlight=False, no_color=console.no_color,
                   force_terminal=console.is_terminal or None)
    wide.print(table)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """A sweep report (`raybig.tune.report.write_report`) as a table, the winner and the curves' path."""
    con = console or Console(highlight=False, soft_wrap=True)
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
