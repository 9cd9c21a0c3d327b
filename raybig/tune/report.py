"""Sweep results from the files a sweep leaves behind: table, curves plot, winner spec.

Works while a sweep runs, after it ends, and after it was interrupted (`raybig sweep report RUN`):
everything is read from `<sweep dir>/{sweep.yaml,status.json,trials/*}`; Ray is not needed.
"""

from __future__ import annotations

import json
import math
from typing import Any

from raybig import storage
from raybig.tune.trial import TRIAL_JSON, TRIALS_DIR, read_curve, read_json

STATE_ORDER = {"finished": 0, "stopped early": 1, "running": 2, "interrupted": 2, "pending": 3, "failed": 4}


def load_sweep(sweep_dir: str) -> Any:
    """The sweep spec recorded in `<sweep_dir>/sweep.yaml` (secrets stay `${VAR}` text)."""
    from raybig.spec import load_spec_text

    # A report needs no secret: `${VAR}`s from secret-looking variables stay text (and need not be set).
    return load_spec_text(storage.read_text(f"{sweep_dir}/sweep.yaml"), source=f"{sweep_dir}/sweep.yaml",
                          resolve_secrets=False)


def collect(sweep_dir: str, final: bool = False) -> list[dict[str, Any]]:
    """One record per trial, from its trial.json, curve.jsonl and Tune's status."""
    spec = load_sweep(sweep_dir)
    status = read_json(f"{sweep_dir}/status.json", {}) or {}
    fs, root = storage.fs_for(storage.join(sweep_dir, TRIALS_DIR))
    names = set(status)
    if fs.exists(root):
        names |= {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)
                  if fs.exists(f"{p}/{TRIAL_JSON}")}
    records = []
    for name in sorted(names):
        tdir = storage.join(sweep_dir, TRIALS_DIR, name)
        info = read_json(f"{tdir}/{TRIAL_JSON}", {}) or {}
        st = status.get(name, {})
        curve = read_curve(tdir)
        steps_target = _trial_steps(tdir) or spec.base.train.steps
        vals = [r[spec.metric] for r in curve if spec.metric in r and (r.get("fresh") or spec.metric != "val_loss")]
        last = vals[-1] if vals else None
        best = (min(vals) if spec.mode == "min" else max(vals)) if vals else None
        ckpts = [r["checkpoint_path"] for r in curve if r.get("checkpoint_path")]
        export = f"{tdir}/export"
        records.append({
            "trial": name, "trial_id": info.get("trial_id") or st.get("trial_id"),
            "params": info.get("params") or st.get("config") or {},
            "state": _state(info.get("state"), st.get("state"), curve, steps_target, final),
            "steps": curve[-1]["step"] if curve else 0, "steps_target": steps_target,
            "metric": last, "best": best, "starts": info.get("starts", 0),
            "error": info.get("error") if st.get("state") != "terminated" else None,
            "tokens": curve[-1].get("tokens", 0) if curve else 0,
            "checkpoint": _uri(sweep_dir, ckpts[-1]) if ckpts else None,
            "export": export if storage.exists(f"{export}/config.json") else None, "run_dir": tdir,
        })
    sign = 1 if spec.mode == "min" else -1

    def key(r: dict[str, Any]) -> tuple:
        m = r["metric"]
        bad = m is None or (isinstance(m, float) and math.isnan(m)) or r["state"] == "failed"
        return (bad, sign * m if not bad else 0.0, STATE_ORDER.get(r["state"], 9))

    return sorted(records, key=key)


def _trial_steps(tdir: str) -> int | None:
    import yaml

    try:
        return int(yaml.safe_load(storage.read_text(f"{tdir}/spec.yaml"))["train"]["steps"])
    except (FileNotFoundError, OSError, KeyError, TypeError, ValueError):
        return None


def _state(trial_state: str | None, tune_state: str | None, curve: list, target: int, final: bool) -> str:
    # Tune's word wins: a trial ASHA stops dies with its Train controller, and its own record may
    # then say "failed" (ActorDiedError) although Tune ended it on purpose.
    if tune_state == "error":
        return "failed"
    if trial_state == "finished" or (curve and curve[-1]["step"] >= target and tune_state == "terminated"):
        return "finished"
    if tune_state == "terminated":
        return "stopped early"  # Tune ended it (ASHA) before its last step
    if trial_state == "failed":
        return "failed"
    if trial_state == "running" or tune_state == "running":
        return "interrupted" if final else "running"
    return "pending"


def _uri(sweep_dir: str, path: str) -> str:
    """Tune reports checkpoint paths without the scheme for fsspec / cloud storage; put it back."""
    if "://" in path or storage.is_local(sweep_dir):
        return path
    return f"{sweep_dir.split('://', 1)[0]}://{path.lstrip('/')}"


def winner(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Best finished trial (its checkpoint is the full run); else best trial with a metric at all."""
    done = [r for r in records if r["state"] == "finished" and r["metric"] is not None]
    some = [r for r in records if r["metric"] is not None and r["state"] != "failed"]
    pick = done or some
    return pick[0] if pick else None


def best_spec_text(sweep_dir: str, spec: Any, best: dict[str, Any]) -> str:
    """The winner as a complete train spec: its own name, the sweep's storage, init_from its export."""
    from pydantic import ValidationError

    from raybig.spec import freeze
    from raybig.spec.models import TrainSpec
    from raybig.spec.yaml_io import load_yaml_text

    # Secret-looking `${VAR}`s in the trial's frozen spec stay `${VAR}` text in best.yaml.
    uri = f"{best['run_dir']}/spec.yaml"
    data = load_yaml_text(storage.read_text(uri), source=uri, resolve_secrets=False).data
    data["name"] = f"{spec.name}-best"
    data["storage"] = {"path": spec.storage.path}
    # Weights only: `raybig run best.yaml` trains the winner further with a fresh optimizer and schedule.
    # Delete init_from to train the winning configuration from scratch.
    data["init_from"] = best["export"]
    how = "trains it further (init_from = the winner's weights)"
    try:
        text = freeze(TrainSpec.model_validate(data))
    except ValidationError:  # a task that cannot start from an export yet (e.g. classification)
        data.pop("init_from")
        text = freeze(TrainSpec.model_validate(data))
        how = "trains the winning configuration from scratch (this task cannot start from an export)"
    header = (f"# Winner of sweep {spec.name!r}: {best['trial']} ({spec.metric} {best['metric']:.4f})\n"
              f"# checkpoint: {best['checkpoint']}\n# export:     {best['export']}\n"
              f"# `raybig run` on this file {how}.\n")
    return header + text


def write_report(sweep_dir: str, final: bool = False) -> dict[str, Any]:
    """Collect every trial, write trials.json, trials.md, curves.png, best.yaml/best.json; return the report.

    Args:
        sweep_dir: the sweep's directory (any fsspec URI).
        final: the sweep has ended (unfinished trials read as interrupted, not running).
    """
    sweep_dir = storage.normalize(sweep_dir)
    spec = load_sweep(sweep_dir)
    records = collect(sweep_dir, final=final)
    best = winner(records)
    report: dict[str, Any] = {"sweep": spec.name, "sweep_dir": sweep_dir, "metric": spec.metric,
                              "mode": spec.mode, "trials": records, "best": None,
                              "total_steps": sum(r["steps"] for r in records),
                              "counts": {s: sum(r["state"] == s for r in records) for s in STATE_ORDER}}
    storage.write_text(f"{sweep_dir}/trials.json", json.dumps(records, indent=2))
    storage.write_text(f"{sweep_dir}/trials.md", markdown_table(spec, records))
    report["curves"] = plot_curves(sweep_dir, spec, records)
    if best is not None and best["export"]:
        storage.write_text(f"{sweep_dir}/best.yaml", best_spec_text(sweep_dir, spec, best))
        report["best"] = {**best, "spec": f"{sweep_dir}/best.yaml"}
        storage.write_text(f"{sweep_dir}/best.json", json.dumps(report["best"], indent=2))
    return report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(spec: Any, records: list[dict[str, Any]]) -> str:
    """The trials as a Markdown table (trials.md): params, state, steps, last and best metric."""
    keys = list(spec.search)
    head = ["#", "trial", *keys, "state", "steps", f"{spec.metric} (last)", f"{spec.metric} (best)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(records, 1):
        row = [str(i), r["trial"], *[_fmt(r["params"].get(k, "")) for k in keys], r["state"], str(r["steps"]),
               _fmt(r["metric"]) if r["metric"] is not None else "-", _fmt(r["best"]) if r["best"] is not None else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(sweep_dir: str, spec: Any, records: list[dict[str, Any]]) -> str | None:
    """Every trial's validation-loss curve against steps (PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    style = {"finished": "-", "stopped early": "--", "failed": ":"}
    drawn, lo, hi = 0, math.inf, -math.inf
    for r in records:
        pts = [(c["step"], c["val_loss"]) for c in read_curve(r["run_dir"]) if c.get("fresh") and "val_loss" in c]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        params = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in r["params"].items())
        label = f"{r['trial'][-11:]} {params}"
        ax.plot(xs, ys, style.get(r["state"], "-."), marker="o", markersize=3, label=f"{label} [{r['state']}]")
        drawn += 1
        lo, hi = min(lo, *ys), max(hi, *ys)
    if drawn and lo > 0 and hi / lo > 10:
        ax.set_yscale("log")  # a diverged trial would flatten everyone else's curve
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"sweep {spec.name}: {len(records)} trials (dashed: stopped early)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="upper right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    fs, path = storage.fs_for(f"{sweep_dir}/curves.png")
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
    return f"{sweep_dir}/curves.png"
