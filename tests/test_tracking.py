"""MLflow tracking (issue 17): file store round trip, nested sweep runs, outages never raise, a real
`mlflow server`. No Ray cluster is started (Tune's callback is driven with fake trials)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from raybig.train.tracking import (
    PARENT_TAG,
    MlflowTracker,
    TrackingError,
    check_tracking_uri,
    flatten_params,
    sweep_callback,
    train_callback,
)

pytestmark = pytest.mark.unit

SPEC = """\
kind: train
name: tiny
model: {n_layer: 2, n_embd: 64}
data: {source: s3://bucket/text, storage_options: {key: "${AWS_KEY}"}}
train: {steps: 3, lr: 0.001}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(tmp_path):
    return (tmp_path / "mlruns").as_uri()


def test_flatten_params_keeps_secret_placeholders():
    flat = flatten_params(SPEC)
    assert flat["model.n_layer"] == "2" and flat["train.lr"] == "0.001"
    assert flat["data.storage_options.key"] == "${AWS_KEY}"
    assert flatten_params({"a": [1, {"b": None}]}) == {"a.0": "1", "a.1.b": "null"}


def test_file_store_run_params_metrics_artifact(store, tmp_path):
    from mlflow.tracking import MlflowClient

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    check_tracking_uri(store)
    with MlflowTracker(store, "raybig-test", run_name="tiny", rank=0) as tr:
        run_id = tr.start(SPEC)
        for step in (1, 2, 3):
            tr.log_metrics({"loss": 4.0 / step, "lr": 1e-3, "phase": "train", "bad": float("nan")}, step)
        tr.log_artifacts(str(export))
    c = MlflowClient(tracking_uri=store)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.n_layer"] == "2"
    assert run.data.params["data.storage_options.key"] == "${AWS_KEY}"
    hist = c.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(1, 4.0), (2, 2.0), (3, 4 / 3)]
    assert "phase" not in run.data.metrics and "bad" not in run.data.metrics
    arts = {a.path for a in c.list_artifacts(run_id)} | {a.path for a in c.list_artifacts(run_id, "export")}
    assert {"spec.yaml", "export", "export/config.json"} <= arts


def test_train_v2_callback_logs_rank0_reports_after_pickling(store):
    from mlflow.tracking import MlflowClient
    from ray import cloudpickle as pickle  # what Ray serializes RunConfig callbacks with

    tr = MlflowTracker(store, "train-cb", rank=0)
    tr.start({"a": 1})
    cb = pickle.loads(pickle.dumps(train_callback(tr)))  # as Ray ships it to the Train controller
    for step in (1, 2):
        cb.after_report(None, [{"step": step, "loss": 1.0 / step}, {"step": step, "loss": 9.0}], None)
    tr.end()
    hist = MlflowClient(tracking_uri=store).get_metric_history(tr.run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 0.5)]


def test_nonzero_rank_does_nothing(store):
    tr = MlflowTracker(store, "x", rank=1)
    assert tr.start({"a": 1}) is None and not tr.enabled
    tr.log_metrics({"loss": 1.0}, 1)
    tr.end()
    assert not os.path.exists(store.removeprefix("file://"))


def test_fake_sweep_nests_one_child_run_per_trial(store):
    from mlflow.tracking import MlflowClient

    parent = MlflowTracker(store, "sweep-exp", run_name="sweep", rank=0)
    parent.start({"kind": "sweep", "metric": "val_loss"})
    # Path 1: trackers (a driver that logs trials itself).
    for i in range(2):
        with parent.child(f"trial_{i}") as child:
            child.start({"train": {"lr": 10.0 ** -(i + 3)}})
            child.log_metrics({"val_loss": 3.0 - i}, step=1)
    # Path 2: Ray Tune's MLflowLoggerCallback, driven with two fake trials.
    cb = sweep_callback(store, "sweep-exp", parent.run_id)
    cb.setup()

    class Trial:
        def __init__(self, i):
            self.config, self.local_path, self.name = {"lr": 0.1 * (i + 1)}, "/nonexistent", f"tune_{i}"

        def __str__(self):
            return self.name

    for i in range(2):
        t = Trial(i)
        cb.log_trial_start(t)
        cb.log_trial_result(1, t, {"training_iteration": 1, "val_loss": 2.0 - i})
        cb.log_trial_end(t)
    parent.end()
    c = MlflowClient(tracking_uri=store)
    exp = c.get_experiment_by_name("sweep-exp")
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.run_id}'")
    names = sorted(r.info.run_name for r in kids)
    assert names == ["trial_0", "trial_1", "tune_0", "tune_1"]
    assert all(r.info.status == "FINISHED" for r in kids)
    assert {r.data.metrics["val_loss"] for r in kids} == {3.0, 2.0, 1.0}


def test_unreachable_server_never_raises(caplog, store, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match="cannot be reached") as e:
        check_tracking_uri(dead, timeout_s=2)
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    with pytest.raises(TrackingError, match="unsupported scheme"):
        check_tracking_uri("ftp://x/y")

    caplog.set_level(logging.WARNING, logger="raybig.train.tracking")
    # Mid-run: the store goes away after the run started (the client now points at a dead port).
    from mlflow.tracking import MlflowClient

    tr = MlflowTracker(store, "outage", rank=0)
    tr.start({"a": 1})
    tr._client = MlflowClient(tracking_uri=dead)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as MlflowTracker sets for http URIs
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    t0 = time.perf_counter()
    for step in range(5):
        tr.log_metrics({"loss": 1.0}, step)
    tr.log_artifacts(store.removeprefix("file://"))
    tr.end()
    assert not tr.enabled and time.perf_counter() - t0 < 30
    warnings = [r for r in caplog.records if "tracking disabled" in r.getMessage()]
    assert len(warnings) == 1
    # Down from the start: start() does not raise either.
    tr2 = MlflowTracker(dead, "outage", rank=0)
    assert tr2.start({"a": 1}) is None and not tr2.enabled


@pytest.mark.slow
def test_real_mlflow_server(tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen(
        [exe, "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # No background job workers (a second process to start): this test needs tracking only.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        # Importing the server alone takes ~20 s on the loaded 2-core CI box; a minute, then skip.
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip("mlflow server did not answer /health within 60 s on this machine")
                time.sleep(0.5)
        check_tracking_uri(uri)
        export = tmp_path / "export"
        export.mkdir()
        (export / "model.safetensors").write_bytes(b"\0" * 16)
        tr = MlflowTracker(uri, "server-exp", run_name="tiny", rank=0)
        run_id = tr.start(SPEC)
        for step in (1, 2, 3):
            tr.log_metrics({"loss": 1.0 / step}, step)
        tr.log_artifacts(str(export))
        c = MlflowClient(tracking_uri=uri)
        assert len(c.get_metric_history(run_id, "loss")) == 3
        assert [a.path for a in c.list_artifacts(run_id, "export")] == ["export/model.safetensors"]
        # The server goes away mid-run: logging and ending do not raise.
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        tr.log_metrics({"loss": 0.1}, 4)
        tr.end()
        assert not tr.enabled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_sweep_trial_child_run_params_keep_secrets_frozen(tmp_path, monkeypatch):
    """A sweep trial's child run: overrides as `search.<path>`, the resolved spec with `${VAR}` kept."""
    from mlflow.tracking import MlflowClient

    from raybig.spec import load_spec_text
    from raybig.spec.sweep import trial_spec
    from raybig.tune.runner import end_parent_run, start_parent_run
    from raybig.tune.trial import MLFLOW_RUN_KEY, trial_tracker

    monkeypatch.setenv("RAYBIG_TEST_API_KEY", "sekrit-value-123")
    store = (tmp_path / "mlruns").as_uri()
    sweep = load_spec_text(f"""kind: sweep
name: s
tracking: {{mlflow: {{tracking_uri: {store}, experiment: sw}}}}
base:
  model: {{target: "jobs.my_models.lstm_lm:build", kwargs: {{api_key: "${{RAYBIG_TEST_API_KEY}}"}}}}
search: {{train.lr: {{grid: [0.1, 0.2]}}}}
""")
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    parent = start_parent_run(sweep, str(sweep_dir))
    spec = trial_spec(sweep, {"train.lr": 0.2}, "trial_1", str(sweep_dir / "trials"))
    info: dict = {}
    child = trial_tracker(sweep, str(sweep_dir), spec, {"train.lr": 0.2}, info)
    child.log_metrics({"step": 3, "loss": 1.5, "note": "x"}, 3)
    child.end()
    again = trial_tracker(sweep, str(sweep_dir), spec, {"train.lr": 0.2}, {MLFLOW_RUN_KEY: child.run_id})
    assert again.run_id == child.run_id  # a restarted trial logs into the same child run
    end_parent_run(parent, {"best": {"metric": 1.5, "trial": "trial_1"}})
    client = MlflowClient(tracking_uri=store)
    c, p = client.get_run(child.run_id), client.get_run(parent.run_id)
    assert c.data.tags["mlflow.parentRunId"] == p.info.run_id and p.info.status == "FINISHED"
    assert c.data.params["search.train.lr"] == "0.2" and c.data.params["train.lr"] == "0.2"
    assert c.data.params["model.kwargs.api_key"] == "${RAYBIG_TEST_API_KEY}"
    assert not any("sekrit" in v for r in (c, p) for v in r.data.params.values())
    assert c.data.metrics == {"step": 3.0, "loss": 1.5} and p.data.metrics["best_metric"] == 1.5
