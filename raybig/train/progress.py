"""Live progress for `raybig run` on a train spec, and the final summary with a sample."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from raybig.spec.models import TrainSpec
from raybig.train.runner import run_train

console = Console(stderr=True, highlight=False)


def run_train_with_progress(spec: TrainSpec, address: str | None = None, resume_from: str | None = None,
                            quiet: bool = False, python_path: list[str] | None = None,
                            verbose: bool = False) -> dict[str, Any]:
    t0 = time.time()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=console, disable=quiet, transient=False)
    first_step: dict[str, float] = {}
    with progress:
        task = progress.add_task(spec.name, total=spec.train.steps, info="starting Ray + DeepSpeed...")

        def on_metrics(m: dict[str, Any]) -> None:
            if m.get("step", 0) > 0 and "t" not in first_step:
                first_step["t"] = time.time() - t0
            info = []
            if "loss" in m:
                info.append(f"loss {m['loss']:.3f}")
            if "val_loss" in m:
                info.append(f"val {m['val_loss']:.3f}")
            if "tokens_per_s" in m:
                info.append(f"{m['tokens_per_s']:,.0f} tok/s")
            progress.update(task, completed=m.get("step", 0), info=" ".join(info) or "step 0")

        result = run_train(spec, address=address, resume_from=resume_from, on_metrics=on_metrics,
                           python_path=python_path, verbose=verbose)
    summary = result.to_json()
    summary["seconds"] = round(time.time() - t0, 1)
    summary["seconds_to_first_step"] = round(first_step.get("t", float("nan")), 1)
    vals = [h["val_loss"] for h in result.history if "val_loss" in h]
    if vals:
        summary["val_loss_first"], summary["val_loss_last"] = vals[0], vals[-1]
    if result.export_dir and spec.sample.max_new_tokens > 0:
        summary["sample"] = sample_text(result.export_dir, spec)
    if not quiet:
        print_summary(spec, summary)
    return summary


def sample_text(export_dir: str, spec: TrainSpec) -> str:
    import torch

    from raybig.data.text import decode, encode
    from raybig.train.export import load_model

    model, _ = load_model(export_dir)
    if not hasattr(model, "generate"):
        return ""
    g = torch.Generator().manual_seed(spec.seed)
    idx = torch.tensor([encode(spec.sample.prompt)], dtype=torch.long)
    outp = model.generate(idx, spec.sample.max_new_tokens, temperature=spec.sample.temperature, generator=g)
    return decode(outp[0].tolist())


def print_summary(spec: TrainSpec, s: dict[str, Any]) -> None:
    m = s["metrics"]
    console.print(f"[green]done[/green] {spec.name}: {m.get('step', 0)} steps in {s['seconds']}s "
                  f"(first step after {s['seconds_to_first_step']}s)")
    if "val_loss_first" in s:
        console.print(f"  val_loss {s['val_loss_first']:.3f} -> {s['val_loss_last']:.3f}")
    if "tokens_per_s" in m:
        console.print(f"  {m['tokens_per_s']:,.0f} tokens/s, step {m.get('step_time_s', 0) * 1000:.0f} ms, "
                      f"peak mem {m.get('peak_mem_bytes', 0) / 2**20:,.0f} MiB/worker")
    console.print(f"  run dir: {s['run_dir']}")
    if s.get("checkpoint"):
        console.print(f"  checkpoint: {s['checkpoint']}")
    if s.get("export_dir"):
        console.print(f"  export: {s['export_dir']}")
    if s.get("sample"):
        console.print("  sample:", style="bold")
        console.print(s["sample"], markup=False)
