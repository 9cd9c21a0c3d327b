"""`raybig eval SPEC_OR_RUN`: perplexity / bits per byte (or a classifier's accuracy) and lm-eval tasks."""

from __future__ import annotations

import json
import os

import click
from rich.table import Table

from raybig.cli.app import _load, console, main, out, set_option
from raybig.errors import UsageError


def _spec_and_run_dir(target: str, overrides: tuple[str, ...]) -> tuple[object, str]:
    """(train spec with absolute paths, run dir) from a spec file or a run directory."""
    from raybig import storage
    from raybig.spec import load_spec_text
    from raybig.spec.models import TrainSpec
    from raybig.spec.paths_resolve import resolve_paths
    from raybig.train.runner import SPEC_FILE, run_dir_of

    if target.endswith((".yaml", ".yml")) and os.path.isfile(target):
        spec = _load(target, overrides)  # SpecError: exit 2 with path + line
        if not isinstance(spec, TrainSpec):
            raise UsageError(f"{target} is a {spec.kind!r} spec; `raybig eval` evaluates a train run")
        spec, _ = resolve_paths(spec)
        return spec, run_dir_of(spec)
    run_dir = storage.normalize(target)
    uri = storage.join(run_dir, SPEC_FILE)
    if not storage.exists(uri):
        raise UsageError(f"{target} is neither a train spec file nor a run directory (no {SPEC_FILE})")
    # The run's own spec (paths already absolute; secrets stay ${VAR}: evaluation needs none).
    spec = load_spec_text(storage.read_text(uri), source=uri, overrides=list(overrides), resolve_secrets=False)
    if not isinstance(spec, TrainSpec):
        raise UsageError(f"{target} holds a {spec.kind!r} run; `raybig eval` evaluates a train run")
    return spec, run_dir


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"
    return str(v)


@main.command("eval")
@click.argument("target", metavar="SPEC_OR_RUN")
@click.option("--task", "tasks", multiple=True, metavar="TASK",
              help="An lm-eval task: a shipped name (raybig_arith_mc, raybig_stdlib_docs) or a task .yaml "
                   "(repeatable; default: the spec's eval.tasks).")
@click.option("--no-perplexity", is_flag=True, help="Skip perplexity / accuracy on the held-out split.")
@click.option("--batches", type=click.IntRange(min=1), default=None,
              help="Validation batches per worker (default: train.eval_batches, the batches val_loss uses).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="lm-eval documents per task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="lm-eval batch size.")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda:0).")
@set_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_cmd(target: str, tasks: tuple[str, ...], no_perplexity: bool, batches: int | None, limit: int | None,
             batch_size: int | None, device: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Evaluate a finished train run's export; results also go to <run>/eval.json.

    SPEC_OR_RUN is the train spec file or its run directory. Measures perplexity and bits per byte
    on the run's held-out validation batches (exactly those of its val_loss, so perplexity =
    exp(val_loss)), a classifier's validation accuracy, and lm-eval tasks, offline. Bad tasks,
    specs or arguments: exit 2; an evaluation that fails on the model: exit 1.
    """
    from raybig.eval.run import evaluate_run

    spec, run_dir = _spec_and_run_dir(target, overrides)
    if not as_json:
        console.print(f"evaluating {run_dir}", soft_wrap=True, markup=False)
    rep = evaluate_run(spec, run_dir, tasks=list(tasks) if tasks else None,  # type: ignore[arg-type]
                       perplexity=False if no_perplexity else None, batches=batches, limit=limit,
                       batch_size=batch_size, device=device)
    if as_json:
        print(json.dumps(rep.to_json(), default=str), file=out.file)
        return
    table = Table(title=f"eval {rep.name} (step {rep.step})", title_justify="left")
    for col in ("what", "metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    if rep.perplexity:
        p = rep.perplexity
        what = f"held-out ({p['batches']} batches, {p['tokens']:,} tokens)"
        for k in ("perplexity", "bits_per_byte", "mean_nll"):
            if p.get(k) is not None:
                table.add_row(what, k, _fmt(p[k]))
                what = ""
        if rep.val_loss is not None:
            table.add_row("", "exp(run's val_loss)", _fmt(__import__("math").exp(rep.val_loss)))
        table.add_row("", "tokens/s", f"{p['tokens_per_s']:,.0f}")
    if rep.classification:
        c = rep.classification
        what = f"validation ({c['examples']} examples)"
        table.add_row(what, "accuracy", _fmt(c["val_accuracy"]))
        table.add_row("", "loss", _fmt(c["val_loss"]))
    if rep.masked_lm:
        m = rep.masked_lm
        what = f"masked validation ({m['batches']} batches, {m['tokens']:,} masked tokens)"
        table.add_row(what, "masked-LM perplexity", _fmt(m["perplexity"]))
        table.add_row("", "masked accuracy", _fmt(m["masked_accuracy"]))
        table.add_row("", "loss", _fmt(m["val_loss"]))
        if rep.val_loss is not None:
            table.add_row("", "run's val_loss", _fmt(rep.val_loss))
    for task, metrics in (rep.harness or {}).items():
        what = f"{task} ({rep.harness_samples.get(task, '?')} docs)"
        for k, v in sorted(metrics.items()):
            table.add_row(what, k, _fmt(v))
            what = ""
    out.print(table)
    out.print(f"wrote {run_dir}/eval.json ({rep.seconds}s)", markup=False, soft_wrap=True)
