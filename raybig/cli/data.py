"""`raybig prepare SPEC`: tokenize a train spec's data into token shards once, with Ray Data."""

from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from raybig.cli.app import _load, console, main, out, set_option
from raybig.errors import UsageError


@main.command("prepare")
@click.argument("spec_path", metavar="SPEC")
@set_option
@click.option("--address", default=None, help="Ray cluster to tokenize on (default: embedded local Ray).")
@click.option("--local", "local", is_flag=True, help="Tokenize in this process instead of Ray Data tasks.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def prepare_cmd(spec_path: str, overrides: tuple[str, ...], address: str | None, local: bool,
                as_json: bool) -> None:
    """Tokenize a train spec's data into token shards (reused by `raybig run` while unchanged).

    The shards go to `data.prepared_path` (default `<storage.path>/.prepared/<fingerprint>`); the
    fingerprint covers the source files (sizes, mtimes), the tokenizer and the data options, so
    running it again on unchanged data does nothing. Prints documents, tokens, shards, bad records
    skipped and seconds.
    """
    from raybig.data.prepare import PrepareProgress, describe
    from raybig.spec.models import TrainSpec
    from raybig.train.runner import prepare_only

    spec = _load(spec_path, overrides)
    if not isinstance(spec, TrainSpec):
        raise UsageError(f"raybig prepare takes a train spec, not kind {spec.kind!r}")
    t0 = time.perf_counter()
    bar = Progress(TextColumn("[bold]prepare"), BarColumn(), TextColumn("{task.completed}/{task.total} items"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                   disable=as_json, transient=True)
    with bar:
        task = bar.add_task("prepare", total=None, info="listing sources...")

        def progress(p: PrepareProgress) -> None:
            bar.update(task, completed=p.items_done, total=p.items_total,
                       info=f"{p.tokens:,} tokens, {p.tokens_per_s:,.0f} tokens/s")

        summary: Any = prepare_only(spec, address=address, use_ray=not local, progress=progress)
    seconds = time.perf_counter() - t0
    if as_json:
        d = {k: v for k, v in summary.__dict__.items() if k not in ("train", "val")}
        d.update(train=summary.train.__dict__, val=summary.val.__dict__, documents=summary.documents,
                 tokens=summary.tokens, wall_seconds=round(seconds, 2))
        print(json.dumps(d, indent=2), file=out.file)
        return
    out.print(describe(summary), markup=False)
    for line in summary.bad_examples[:5]:
        out.print(f"  skipped {line}", markup=False)
    out.print(f"  {seconds:.1f} s wall", markup=False)
