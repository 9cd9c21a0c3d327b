"""A digits MLP (scikit-learn's 8x8 digits, offline) trained through 2-worker Ray Train + DeepSpeed
ZeRO-2 reaches >= 90% validation accuracy; accuracy is reported with the loss in metrics.jsonl."""

from __future__ import annotations

import json
import pathlib

import pytest

from raybig.spec import load_spec

pytestmark = pytest.mark.ray
ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_digits_mlp_two_workers_reaches_90_percent(ray_local, tmp_path):
    from raybig.eval.run import evaluate_run
    from raybig.train.runner import run_train

    spec = load_spec(str(ROOT / "jobs" / "digits.yaml"), [f"storage.path={tmp_path}"])
    res = run_train(spec)
    m = res.metrics
    assert res.steps == 80 and m["val_accuracy"] >= 0.90, m
    records = [json.loads(line) for line in open(f"{res.run_dir}/metrics.jsonl")]
    trained = [r for r in records if "loss" in r]
    assert trained and all(0.0 <= r["accuracy"] <= 1.0 for r in trained)
    assert all("val_accuracy" in r for r in records if "val_loss" in r)
    # The export loads back as the same classifier: accuracy over the whole validation split.
    ev = evaluate_run(spec, res.run_dir).classification
    assert ev["examples"] == 360 and ev["val_accuracy"] == pytest.approx(m["val_accuracy"], abs=1e-6)
