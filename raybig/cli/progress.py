"""The terminal side of `raybig run`: a live progress bar for training and the final summary."""

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
        """Print `text` as is."""
        self.console.print(text, markup=False, highlight=False)

    def serving(self, info: dict[str, Any]) -> None:
        """Print where the app serves and how to call it."""
        self.console.print(f"[green]serving[/green] {info['name']!r} at {info['url']} "
                           f"(OpenAI-compatible: POST /completions, GET /models); Ctrl-C stops it")
        if info.get("api_key_env"):
            self.console.print(f"  API key: the value of ${info['api_key_env']}")


def print_train_summary(console: Console, r: TrainResult) -> None:
    """The few lines `raybig run` prints when a train run ends."""
    m = r.metrics
    first = f" (first step after {r.seconds_to_first_step}s)" if r.seconds_to_first_step is not None else ""
    console.print(f"[green]done[/green] {r.name}: {r.steps} steps in {r.seconds}s{first}")
    if r.val_loss_first is not None and r.val_loss_last is not None:
        console.print(f"  val_loss {r.val_loss_first:.3f} -> {r.val_loss_last:.3f}")
    if "tokens_per_s" in m:
        console.print(f"  {m['tokens_per_s']:,.0f} tokens/s, step {m.get('step_time_s', 0) * 1000:.0f} ms, "
                      f"peak mem {m.get('peak_mem_bytes', 0) / 2**20:,.0f} MiB/worker")
    console.print(f"  run dir: {r.run_dir}")
    if r.checkpoint:
        console.print(f"  checkpoint: {r.checkpoint}")
    if r.export_dir:
        console.print(f"  export: {r.export_dir}")
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
