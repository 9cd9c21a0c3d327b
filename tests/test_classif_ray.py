"""Classifiers and encoders through 2-worker Ray Train + DeepSpeed ZeRO-2: a digits MLP and a small
CNN (scikit-learn's 8x8 digits, offline) reach >= 90% validation accuracy, reported with the loss in
metrics.jsonl; a tiny BERT-shaped masked LM lowers its validation loss."""

from __future__ import annotations

import json
import math
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


def test_digits_cnn_two_workers_reaches_90_percent(ray_local, tmp_path):
    from raybig.train.runner import run_train

    spec = load_spec(str(ROOT / "jobs" / "digits_cnn.yaml"), [f"storage.path={tmp_path}"])
    assert spec.classifier is not None and spec.classifier.arch == "cnn" and spec.resources.workers == 2
    res = run_train(spec)
    assert res.steps == 80 and res.metrics["val_accuracy"] >= 0.90, res.metrics


def test_tiny_masked_lm_two_workers_lowers_its_loss(ray_local, tmp_path):
    """A BERT-shaped encoder from an inline config (jobs/mlm_tiny.yaml), BERT masking, 2 workers ZeRO-2."""
    from raybig.train.runner import run_train

    spec = load_spec(str(ROOT / "jobs" / "mlm_tiny.yaml"), [f"storage.path={tmp_path}", "train.steps=40",
                                                            "train.eval_every=20", "checkpoint.every=40"])
    res = run_train(spec)
    records = [json.loads(line) for line in open(f"{res.run_dir}/metrics.jsonl")]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    trained = [r for r in records if "loss" in r]
    assert res.steps == 40 and len(val) >= 2 and val[-1] < val[0] - 0.5, val
    assert all(0.0 <= r["masked_accuracy"] <= 1.0 for r in trained)
    assert trained[-1]["masked_accuracy"] > trained[0]["masked_accuracy"], trained
    # `raybig eval`: the export on the same masked validation batches gives the run's last val_loss.
    from raybig.eval.run import evaluate_run

    ev = evaluate_run(spec, res.run_dir).masked_lm
    assert ev is not None and ev["val_loss"] == pytest.approx(val[-1], rel=1e-4), (ev, val)
    assert ev["perplexity"] == pytest.approx(math.exp(val[-1]), rel=1e-4) and 0 < ev["masked_accuracy"] < 1
