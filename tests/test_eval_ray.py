"""Issue 17 on a real 2-worker Ray Train + DeepSpeed run (one run, ~20 s): the spec's `eval:` section
at the end of training, `raybig eval` perplexity == exp(val_loss) of the same batches, and MLflow
tracking into a local file store, read back with MLflow's own client."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from raybig.spec import load_spec_text

pytestmark = pytest.mark.ray


def test_run_evaluates_at_end_and_tracks_to_mlflow(ray_local, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from raybig.cli import main
    from raybig.runners import run_spec

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    store = (tmp_path / "mlruns").as_uri()
    corpus = tmp_path / "corpus"  # a small local corpus: preparing stdlib:// would dominate the test
    corpus.mkdir()
    for d in range(16):
        (corpus / f"m{d:02d}.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {d}\n"
                                                   for i in range(d * 60, d * 60 + 60)))
    spec = load_spec_text(f"""
kind: train
name: evtrack
seed: 1
model: {{preset: gpt-debug}}
data: {{path: "{corpus}", seq_len: 32, val_fraction: 0.2}}
train: {{steps: 4, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 1, eval_every: 2, eval_batches: 2, log_every: 1}}
deepspeed: {{zero_stage: 2}}
resources: {{workers: 2, cpus_per_worker: 1}}
storage: {{path: {tmp_path / 'runs'}}}
checkpoint: {{every: 4, keep: 1}}
sample: {{max_new_tokens: 0, prompt: "${{AWS_SECRET_ACCESS_KEY}}"}}
eval: {{perplexity: true}}
tracking: {{mlflow: {{tracking_uri: "{store}", experiment: evtest}}}}
""")
    res = run_spec(spec)
    run_dir = res.run_dir
    # The eval: section ran on the export: perplexity of exactly val_loss's batches.
    ev = res.evaluation
    assert ev is not None and "error" not in ev, ev
    # Tolerance: the same fp32 weights and batches; the loop sums batch means in float64 and
    # averages over ranks with gloo, the eval sums token NLLs in float64: 1e-5 relative.
    assert ev["perplexity"]["perplexity"] == pytest.approx(math.exp(res.val_loss_last), rel=1e-5)
    assert ev["perplexity"]["batches"] == 4 and ev["perplexity"]["tokens"] == 4 * 4 * 32
    assert json.loads(open(f"{run_dir}/eval.json").read())["perplexity"] == ev["perplexity"]
    # `raybig eval RUN --json` again, from the run directory alone.
    r = CliRunner().invoke(main, ["eval", run_dir, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["perplexity"]["mean_nll"] == pytest.approx(res.val_loss_last, rel=1e-5)

    # MLflow: one FINISHED run with the frozen spec (secret as ${VAR}), rank 0's metrics, the export.
    run_id = json.loads(open(f"{run_dir}/run.json").read())["mlflow_run_id"]
    c = MlflowClient(tracking_uri=store)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "evtrack"
    p = run.data.params
    assert p["name"] == "evtrack" and p["train.lr"] == "0.003" and p["tracking.mlflow.experiment"] == "evtest"
    assert p["sample.prompt"] == "${AWS_SECRET_ACCESS_KEY}" and "s3cr3t-value" not in json.dumps(p)
    loss = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "loss"))
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    vals = {m.step: m.value for m in c.get_metric_history(run_id, "val_loss")}
    assert vals[4] == pytest.approx(res.val_loss_last)
    assert run.data.metrics["eval/perplexity"] == pytest.approx(math.exp(res.val_loss_last), rel=1e-5)
    arts = {a.path for a in c.list_artifacts(run_id, "export")}
    assert "export/config.json" in arts and "export/model.safetensors" in arts
