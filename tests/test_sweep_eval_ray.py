"""A sweep ranked by an end-of-training evaluation result, tracked in MLflow (real Ray Tune + Train +
DeepSpeed, a real MLflow file store read back with MLflow's client).

Two digits-classifier trials (1 worker each, both at once): the sweep's metric `eval.val_accuracy` is
measured by the base spec's `eval:` section inside each trial after it trains; the better lr wins.
The sweep is one parent MLflow run with one nested child run per trial (params: the trial's
overrides and its resolved spec; metrics per step; the final metric).
"""

from __future__ import annotations

import json
import pathlib

import pytest

from raybig.spec import load_spec_text
from raybig.tune import run_sweep

pytestmark = pytest.mark.ray

SWEEP = """\
kind: sweep
name: digits-lr
storage: {{path: {storage}}}
tracking: {{mlflow: {{tracking_uri: {store}, experiment: sweeps}}}}
base:
  task: classification
  classifier: {{arch: mlp, hidden: [64]}}
  train: {{steps: 16, micro_batch_size: 32, lr: 1.0e-2, warmup_steps: 1, weight_decay: 0.0, eval_every: 8,
          eval_batches: 2, log_every: 4}}
  deepspeed: {{zero_stage: 0}}
  resources: {{workers: 1, cpus_per_worker: 0.5}}
  checkpoint: {{every: 16, keep: 1, max_failures: 0}}
  eval: {{perplexity: true}}
search:
  train.lr: {{grid: [3.0e-2, 1.0e-6]}}
algorithm: grid
scheduler: none
metric: eval.val_accuracy
mode: max
max_concurrent_trials: 2
"""


def test_sweep_by_eval_metric_with_mlflow_child_runs(ray_local, tmp_path, monkeypatch, one_torch_thread):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    spec = load_spec_text(SWEEP.format(storage=tmp_path / "runs", store=store))
    rep = run_sweep(spec)

    # The evaluation ran in each trial; its result ranks the trials and picks the winner.
    trials = {r["params"]["train.lr"]: r for r in rep["trials"]}
    assert {r["state"] for r in trials.values()} == {"finished"}, rep["trials"]
    good, bad = trials[3.0e-2], trials[1.0e-6]
    assert good["metric"] > bad["metric"] and good["metric"] >= 0.6, (good["metric"], bad["metric"])
    assert rep["best"]["params"] == {"train.lr": 3.0e-2} and rep["metric"] == "eval.val_accuracy"
    for r in (good, bad):
        ev = json.loads((pathlib.Path(r["run_dir"]) / "eval.json").read_text())
        assert ev["classification"]["val_accuracy"] == pytest.approx(r["metric"])

    # MLflow: one parent, one child per trial, read back with MLflow's own client.
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("raybig.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("raybig.kind") == "sweep-trial"]
    assert len(parent) == 1 and len(children) == 2, [r.data.tags for r in runs]
    p = parent[0]
    assert p.info.status == "FINISHED" and p.data.metrics["best_metric"] == pytest.approx(good["metric"])
    assert p.data.tags["raybig.best_trial"] == good["trial"]
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == p.info.run_id and c.info.status == "FINISHED"
        params = c.data.params
        assert float(params["search.train.lr"]) == float(params["train.lr"])
        assert params["task"] == "classification" and params["name"] == c.data.tags["mlflow.runName"]
        trial = good if float(params["train.lr"]) == 3.0e-2 else bad
        assert c.data.metrics["final_metric"] == pytest.approx(trial["metric"])
        assert c.data.metrics["eval.val_accuracy"] == pytest.approx(trial["metric"])
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "loss")]
        assert steps == [4, 8, 12, 16], steps  # every report, at its step
        assert [m.step for m in client.get_metric_history(c.info.run_id, "val_accuracy")] == [0, 8, 16]
    assert p.data.params["metric"] == "eval.val_accuracy"
