"""Run reports a person can look at: PNG plots and a text summary from a run's files.

`raybig report RUN` reads `<run_dir>/metrics.jsonl` (written by `raybig run`) and writes, under
`<run_dir>/report/` (or `--out`):
  loss.png          training loss and validation loss against step
  lr.png            learning rate against step
  throughput.png    tokens/s against step
  summary.txt       the short text summary that is also printed
  tensorboard/      TensorBoard event files (only with --tensorboard)
For a sweep directory it delegates to the sweep report (`raybig.tune.report`: trial curves, table).
Ray is not needed; the run may be local or on any fsspec URI.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

from raybig import storage
from raybig.errors import ReportError
from raybig.train.result import TrainResult, read_metrics


@dataclass
class RunReport:
    """What `raybig report` wrote and found.

    Attributes:
        kind: "train" or "sweep".
        files: URIs of the plots and summary written.
        summary: the short text summary (also in summary.txt).
        stats: the numbers behind the summary.
        result: a train run's `TrainResult` (the same record `raybig run --json` prints); None for a sweep.
    """

    run_dir: str
    kind: str
    out_dir: str
    files: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    result: TrainResult | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (`result` as `TrainResult.to_json()`)."""
        return {"run_dir": self.run_dir, "kind": self.kind, "out_dir": self.out_dir, "files": self.files,
                "summary": self.summary, "stats": self.stats,
                "result": self.result.to_json() if self.result else None}


def read_history(run_dir: str) -> list[dict[str, Any]]:
    """The run's metric records, one per step (last record of a step wins), sorted by step.

    Raises:
        ReportError: no `metrics.jsonl`, or a line that is not JSON.
    """
    return read_metrics(run_dir)


def series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) where `key` is present and finite."""
    xs, ys = [], []
    for h in history:
        v = h.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(h["step"])
            ys.append(float(v))
    return xs, ys


def summarize(history: list[dict[str, Any]], name: str = "") -> tuple[list[str], dict[str, Any]]:
    """A few lines a person reads first, and the numbers behind them."""
    if not history:
        return [f"{name}: no steps recorded yet"], {}
    _, loss = series(history, "loss")
    vsteps, vloss = series(history, "val_loss")
    _, tps = series(history, "tokens_per_s")
    _, st = series(history, "step_time_s")
    last = history[-1]
    stats: dict[str, Any] = {
        "steps": last["step"], "tokens": max((h.get("tokens", 0) or 0) for h in history),
        "first_loss": loss[0] if loss else None, "final_loss": loss[-1] if loss else None,
        "first_val_loss": vloss[0] if vloss else None, "final_val_loss": vloss[-1] if vloss else None,
        "best_val_loss": min(vloss) if vloss else None,
        "best_val_step": vsteps[vloss.index(min(vloss))] if vloss else None,
        "mean_tokens_per_s": sum(tps) / len(tps) if tps else None,
        "mean_step_time_s": sum(st) / len(st) if st else None,
        "peak_mem_bytes": max((h.get("peak_mem_bytes") or 0) for h in history) or None,
    }
    # Classifiers report `accuracy`, masked LMs `masked_accuracy` (on the masked tokens); causal LMs neither.
    acc_key = "accuracy" if series(history, "accuracy")[1] or series(history, "val_accuracy")[1] else "masked_accuracy"
    _, acc = series(history, acc_key)
    vasteps, vacc = series(history, f"val_{acc_key}")
    if acc or vacc:
        stats.update(accuracy_metric=acc_key, final_accuracy=acc[-1] if acc else None,
                     final_val_accuracy=vacc[-1] if vacc else None, best_val_accuracy=max(vacc) if vacc else None,
                     best_val_accuracy_step=vasteps[vacc.index(max(vacc))] if vacc else None)
    lines = [f"run {name}: {stats['steps']} steps, {stats['tokens']:,} tokens"]
    if loss:
        lines.append(f"loss {_f(stats['first_loss'])} -> {_f(stats['final_loss'])}")
    if vloss:
        lines.append(f"val_loss {_f(stats['first_val_loss'])} -> {_f(stats['final_val_loss'])} "
                     f"(best {_f(stats['best_val_loss'])} at step {stats['best_val_step']})")
    if vacc:
        lines.append(f"val_{acc_key} {_f(vacc[0])} -> {_f(vacc[-1])} (best {_f(max(vacc))} at step "
                     f"{stats['best_val_accuracy_step']})")
    elif acc:
        lines.append(f"{acc_key} {_f(acc[0])} -> {_f(acc[-1])}")
    if tps:
        lines.append(f"throughput {stats['mean_tokens_per_s']:,.0f} tokens/s mean, "
                     f"step time {stats['mean_step_time_s'] * 1000:.1f} ms mean")
    if stats["peak_mem_bytes"]:
        lines.append(f"peak memory per worker {stats['peak_mem_bytes'] / 2**20:,.0f} MiB")
    return lines, stats


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _plot(panels: list[tuple[str, list[int], list[float]]], title: str, ylabel: str,
          logy: bool = False) -> bytes | None:
    """One PNG with a line per (label, steps, values); None when there is nothing to draw."""
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and cluster nodes have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for label, xs, ys in panels:
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if logy and all(y > 0 for _, _, ys in panels for y in ys):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if len(panels) > 1:
            ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _write_bytes(uri: str, data: bytes) -> None:
    fs, path = storage.fs_for(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def train_report(run_dir: str, out_dir: str | None = None, tensorboard: bool = False) -> RunReport:
    """Plots + summary for a train run directory."""
    run_dir = storage.normalize(run_dir)
    result = TrainResult.from_run_dir(run_dir)
    history = result.history
    out = storage.normalize(out_dir) if out_dir else storage.join(run_dir, "report")
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    rep = RunReport(run_dir, "train", out, result=result)
    rep.summary, rep.stats = summarize(history, name)
    plots = {
        "loss.png": _plot([("loss", *series(history, "loss")), ("val_loss", *series(history, "val_loss"))],
                          f"{name}: loss", "cross-entropy (nats/token)"),
        "accuracy.png": _plot([(k, *series(history, k)) for k in ("accuracy", "val_accuracy", "masked_accuracy",
                                                                   "val_masked_accuracy")],
                              f"{name}: accuracy", "accuracy (0-1)"),
        "lr.png": _plot([("lr", *series(history, "lr"))], f"{name}: learning rate", "learning rate"),
        "throughput.png": _plot([("tokens/s", *series(history, "tokens_per_s"))], f"{name}: throughput",
                                "tokens/s (all workers)"),
    }
    for fname, data in plots.items():
        if data is not None:
            _write_bytes(storage.join(out, fname), data)
            rep.files.append(storage.join(out, fname))
    storage.write_text(storage.join(out, "summary.txt"), "\n".join(rep.summary) + "\n")
    rep.files.append(storage.join(out, "summary.txt"))
    if tensorboard:
        rep.files.append(write_tensorboard(history, storage.join(out, "tensorboard")))
    return rep


TB_KEYS = {"loss": "train/loss", "val_loss": "val/loss", "lr": "train/lr", "tokens_per_s": "perf/tokens_per_s",
           "step_time_s": "perf/step_time_s", "peak_mem_bytes": "perf/peak_mem_bytes",
           "checkpoint_save_s": "perf/checkpoint_save_s", "accuracy": "train/accuracy",
           "val_accuracy": "val/accuracy", "masked_accuracy": "train/masked_accuracy",
           "val_masked_accuracy": "val/masked_accuracy"}


def write_tensorboard(history: list[dict[str, Any]], tb_dir: str) -> str:
    """Scalars as TensorBoard event files (local directories only; needs the `tensorboard` package)."""
    if not storage.is_local(tb_dir):
        raise ReportError(f"--tensorboard writes local event files; {tb_dir} is not local (use --out)")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ReportError("--tensorboard needs the tensorboard package: pip install 'raybig[obs]'") from None
    path = storage.normalize(tb_dir)
    w = SummaryWriter(log_dir=path)
    try:
        for h in history:
            for key, tag in TB_KEYS.items():
                v = h.get(key)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    w.add_scalar(tag, float(v), global_step=h["step"])
    finally:
        w.close()
    return path


def sweep_report(sweep_dir: str) -> RunReport:
    """The sweep's own report (trial curves, table, winner), written beside the sweep."""
    from raybig.tune.report import write_report

    rep = write_report(sweep_dir)
    out = RunReport(sweep_dir, "sweep", sweep_dir)
    out.files = [p for p in (rep.get("curves"), f"{sweep_dir}/trials.md") if p]
    counts = ", ".join(f"{n} {s}" for s, n in (rep.get("counts") or {}).items() if n)
    out.summary = [f"sweep {rep.get('sweep')}: {len(rep.get('trials', []))} trials ({counts}), "
                   f"{rep.get('total_steps', 0)} training steps in all"]
    best = rep.get("best")
    if best:
        out.summary.append(f"best: {best.get('trial')} {rep.get('metric')}={_f(best.get('metric'))} "
                           f"params {best.get('params')}")
    out.stats = {"counts": rep.get("counts"), "best": best}
    return out


def report(run: str, out_dir: str | None = None, tensorboard: bool = False) -> RunReport:
    """Dispatch on what `run` is: a sweep directory, or a train run directory."""
    run = storage.normalize(run)
    if storage.exists(storage.join(run, "sweep.yaml")):
        return sweep_report(run)
    return train_report(run, out_dir, tensorboard)
