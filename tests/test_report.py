"""`raybig report` on a run directory (no Ray): PNGs with real curves, summary, TensorBoard, errors.

The same command on a run that really trained is checked in test_dashboards_prometheus.py.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
from click.testing import CliRunner

from raybig.cli import main
from raybig.report import ReportError, read_history, report, summarize

pytestmark = pytest.mark.unit


def fake_run(root: pathlib.Path, steps: int = 40) -> pathlib.Path:
    """A run dir shaped like `raybig run` leaves it (records as train_worker reports them)."""
    run = root / "runs" / "demo"
    run.mkdir(parents=True)
    lines = [{"step": 0, "val_loss": 5.6}]
    for s in range(2, steps + 1, 2):
        rec = {"step": s, "loss": 5.5 * math.exp(-s / 25) + 1.0, "lr": 1e-3 * min(1, s / 8),
               "step_time_s": 0.05 + 0.01 * (s % 6), "tokens_per_s": 8000 + 300 * (s % 5),
               "tokens": s * 512, "samples": s * 8, "peak_mem_bytes": 500 * 2**20 + s}
        if s % 10 == 0:
            rec["val_loss"] = 5.6 * math.exp(-s / 30) + 1.1
        lines.append(rec)
    lines.append({"step": 20, "checkpoint_save_s": 0.02})  # a later record of the same step merges in
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "run.json").write_text(json.dumps({"name": "demo", "kind": "train"}))
    return run


def test_report_writes_plots_and_summary(tmp_path):
    run = fake_run(tmp_path)
    rep = report(str(run))
    out = run / "report"
    assert rep.kind == "train" and rep.out_dir == str(out)
    for name in ("loss.png", "lr.png", "throughput.png"):
        assert str(out / name) in rep.files
        assert_real_png(out / name)
    text = (out / "summary.txt").read_text()
    assert "run demo: 40 steps, 20,480 tokens" in text
    assert "val_loss 5.6000 ->" in text and "best" in text
    assert rep.stats["best_val_step"] == 40 and rep.stats["final_loss"] < rep.stats["first_loss"]


def test_classifier_report_has_accuracy_line_stats_and_plot(tmp_path):
    run = fake_run(tmp_path)
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        if "loss" in r:
            r["accuracy"] = min(1.0, 0.1 + r["step"] / 50)
        if "val_loss" in r:
            r["val_accuracy"] = 0.9 if r["step"] == 30 else min(0.85, 0.1 + r["step"] / 50)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep = report(str(run))
    assert_real_png(run / "report" / "accuracy.png")
    assert "val_accuracy 0.1000 -> 0.8500 (best 0.9000 at step 30)" in (run / "report" / "summary.txt").read_text()
    assert rep.stats["best_val_accuracy"] == 0.9 and rep.stats["final_accuracy"] == 0.9
    lines, stats = summarize(read_history(str(fake_run(tmp_path / "lm"))), "lm")  # a causal LM: none of it
    assert "accuracy_metric" not in stats and not any("accuracy" in ln for ln in lines)
    assert not (tmp_path / "lm" / "runs" / "demo" / "report" / "accuracy.png").exists()


def test_history_dedupes_steps_and_skips_blank_lines(tmp_path):
    run = fake_run(tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("\n")
    h = read_history(str(run))
    assert [r["step"] for r in h] == sorted({r["step"] for r in h})
    assert h[10]["step"] == 20 and h[10]["checkpoint_save_s"] == 0.02 and "loss" in h[10]


def test_summary_of_an_empty_run():
    lines, stats = summarize([], "x")
    assert lines == ["x: no steps recorded yet"] and stats == {}


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = fake_run(tmp_path)
    rep = report(str(run), out_dir=str(tmp_path / "out"), tensorboard=True)
    tb = tmp_path / "out" / "tensorboard"
    assert str(tb) in rep.files
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "train/lr", "perf/tokens_per_s"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(2, 41, 2))
    assert loss[0].value == pytest.approx(5.5 * math.exp(-2 / 25) + 1.0, rel=1e-6)


def test_cli_report_prints_summary_and_files(tmp_path):
    run = fake_run(tmp_path)
    r = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "run demo: 40 steps" in r.output and f"wrote {tmp_path / 'o' / 'loss.png'}" in r.output
    r = CliRunner().invoke(main, ["report", str(run), "--json", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 0 and json.loads(r.output)["stats"]["steps"] == 40


def test_cli_report_from_the_spec_file(tmp_path):
    run = fake_run(tmp_path)
    spec = tmp_path / "demo.yaml"
    spec.write_text(f"kind: train\nname: demo\nmodel: {{preset: gpt-debug}}\n"
                    f"data: {{path: 'stdlib://'}}\nstorage: {{path: {run.parent}}}\n")
    r = CliRunner().invoke(main, ["report", str(spec), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "loss.png").exists()


def test_cli_report_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no metrics.jsonl" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    r = CliRunner().invoke(main, ["report", str(bad)])
    assert r.exit_code == 2 and "metrics.jsonl:2: not JSON" in r.output
    with pytest.raises(ReportError):
        report(str(tmp_path / "nope"))


def assert_real_png(path: pathlib.Path) -> None:
    """A PNG that shows a plot: real size, and ink in more than one colour (not blank)."""
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    # a curve, axes and labels: many non-white pixels, in more than one colour
    ink = (img[..., :3].sum(axis=-1) < 2.9).mean()
    assert 0.01 < ink < 0.6, ink
    assert img[..., :3].std() > 0.05


SWEEP_YAML = """kind: sweep
name: grid
base:
  kind: train
  name: trial
  model: {preset: gpt-debug}
  data: {path: "stdlib://", seq_len: 32, max_tokens: 200000}
  train: {steps: 8, micro_batch_size: 4, lr: 0.003, warmup_steps: 1, eval_every: 2, log_every: 2}
search:
  train.lr: {grid: [3.0, 0.003]}
algorithm: grid
metric: val_loss
mode: min
storage: {path: STORAGE}
"""


def fake_sweep(root: pathlib.Path) -> pathlib.Path:
    """A finished 2-trial sweep dir in the layout raybig.tune writes (sweep.yaml, status.json, trials/)."""
    sweep = root / "runs" / "grid"
    status = {}
    for i, (lr, vals) in enumerate([(3.0, [5.35, 214.3, 153.3]), (0.003, [5.35, 4.80, 4.43])]):
        name = f"trial_x_0000{i}"
        t = sweep / "trials" / name
        t.mkdir(parents=True)
        (t / "trial.json").write_text(json.dumps({"trial_id": f"x_0000{i}", "name": name,
                                                  "params": {"train.lr": lr}, "state": "finished",
                                                  "starts": 1, "error": None}))
        (t / "curve.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v, "loss": v, "fresh": True,
                                                           "tokens": s * 256}) + "\n"
                                               for s, v in zip((2, 4, 8), vals, strict=True)))
        status[name] = {"trial_id": f"x_0000{i}", "state": "terminated", "config": {"train.lr": lr}, "step": 8}
    (sweep / "status.json").write_text(json.dumps(status))
    (sweep / "sweep.yaml").write_text(SWEEP_YAML.replace("STORAGE", str(root / "runs")))
    return sweep


def test_report_on_a_sweep_plots_the_trial_curves(tmp_path):
    sweep = fake_sweep(tmp_path)
    r = CliRunner().invoke(main, ["report", str(sweep)])
    assert r.exit_code == 0, r.output
    assert "sweep grid: 2 trials (2 finished)" in r.output
    assert_real_png(sweep / "curves.png")
    assert "trial_x_00001" in (sweep / "trials.md").read_text()
