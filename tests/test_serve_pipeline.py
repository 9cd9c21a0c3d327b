"""`kind: pipeline` end to end: a 2-trial sweep -> a short train of the winner -> a serving endpoint."""

from __future__ import annotations

import json

import pytest
import requests

from raybig.spec import SpecError, load_spec_text

PIPE = """
kind: pipeline
name: t-pipe
storage: {{path: {storage}}}
sweep:
  name: t-pipe-sweep
  base:
    model: {{preset: gpt-debug}}
    data: {{path: "stdlib://", seq_len: 32, max_tokens: 100000}}
    train: {{steps: 4, micro_batch_size: 4, warmup_steps: 1, eval_every: 4, eval_batches: 1, log_every: 2}}
    deepspeed: {{zero_stage: 0}}
    resources: {{workers: 1, cpus_per_worker: 1}}
    checkpoint: {{every: 4, keep: 1}}
    sample: {{max_new_tokens: 0}}
  search:
    train.lr: {{choice: [1.0e-3, 3.0e-3]}}
  algorithm: grid
  scheduler: none
train:
  set: {{train.steps: 8, checkpoint.every: 8}}
serve:
  route_prefix: /t-pipe
  resources: {{num_cpus: 0.25}}
  generation: {{max_tokens: 8}}
"""


@pytest.mark.unit
def test_pipeline_spec_checks_stages():
    spec = load_spec_text(PIPE.format(storage="/tmp/x"))
    assert spec.serve_spec("/e").route_prefix == "/t-pipe" and spec.train.set["train.steps"] == 8
    for bad, words in [("  checkpoint: /x\n", "set by the pipeline"),
                       ("  batching: {max_batch_size: 9, max_ongoing_requests: 2}\n", "cap batches"),
                       ("  quantize: int3\n", "int8")]:
        with pytest.raises(SpecError) as e:
            load_spec_text(PIPE.format(storage="/tmp/x") + bad)
        assert words in str(e.value) and "serve" in str(e.value)
    with pytest.raises(SpecError) as e:
        load_spec_text(PIPE.format(storage="/tmp/x").replace("train.steps: 8", "train.stepz: 8"))
    assert "cannot apply to the train spec" in str(e.value)


@pytest.mark.ray
@pytest.mark.slow
def test_pipeline_sweeps_trains_serves_and_skips_finished_stages(ray_local, tmp_path):
    from ray import serve

    from raybig.cluster.ray_env import free_port
    from raybig.pipeline import pipeline_dir, read_state, run_pipeline
    from raybig.serve.deploy import delete_app

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # no-op if already up
    spec = load_spec_text(PIPE.format(storage=tmp_path))
    state = run_pipeline(spec, block=False)
    st = state["stages"]
    assert [st[s]["status"] for s in ("sweep", "train", "serve")] == ["finished"] * 3
    assert st["train"]["export"].startswith(pipeline_dir(spec))
    url = st["serve"]["url"]
    r = requests.post(f"{url}/completions", json={"prompt": "def ", "max_tokens": 8}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    # Run again: sweep and train are skipped (their records are untouched), serve redeploys idempotently.
    again = run_pipeline(spec, block=False)["stages"]
    assert again["sweep"] == st["sweep"] and again["train"] == st["train"]
    assert json.loads(json.dumps(read_state(spec)))["stages"]["serve"]["status"] == "finished"
    delete_app("t-pipe", st["serve"]["dashboard"])
