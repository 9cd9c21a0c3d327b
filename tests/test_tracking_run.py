"""A train run's tracking as `run_train` drives it (`RunTracking`), without Ray: the spec's section,
params from the frozen spec, rank 0's records, a store that goes away mid-run, and results logged
after training into the same MLflow run."""

from __future__ import annotations

import json
import logging

import pytest

from raybig.errors import SpecError, TrackingError
from raybig.spec import load_spec_text
from raybig.train.tracking import MLFLOW_RUN_KEY, RunTracking, log_to_run

pytestmark = pytest.mark.unit


def spec_with(uri: str, name: str = "tr"):
    return load_spec_text(f"kind: train\nname: {name}\nmodel: {{preset: gpt-debug}}\n"
                          f"tracking: {{mlflow: {{tracking_uri: '{uri}', experiment: unit}}}}\n")


def test_no_tracking_section_does_nothing(tmp_path):
    t = RunTracking.for_spec(load_spec_text("kind: train\nname: x\n"))
    t.start(None, str(tmp_path))
    t.log({"step": 1, "loss": 1.0})
    t.finish(None)
    assert t.run_id is None and not list(tmp_path.iterdir())


def test_spec_section_checked_at_validate(tmp_path):
    with pytest.raises(SpecError, match="unsupported scheme 'ftp'"):
        spec_with("ftp://host/x")
    with pytest.raises(SpecError, match="three slashes"):
        spec_with("file://relative/dir")
    s = load_spec_text(f"kind: train\nname: x\ntracking: {{mlflow: {{tracking_uri: {tmp_path}/ml}}}}\n")
    assert s.tracking.mlflow.tracking_uri == (tmp_path / "ml").as_uri()  # a plain path: a file store
    # A server that is not there: refused before anything starts (run_train calls for_spec before Ray).
    with pytest.raises(TrackingError, match="cannot be reached") as e:
        RunTracking.for_spec(spec_with("http://127.0.0.1:9"))
    assert e.value.exit_code == 2


def test_run_tracking_round_trip_and_outage(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    spec = spec_with(store)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"name": "tr", "kind": "train"}))
    export = run_dir / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    t = RunTracking.for_spec(spec)
    t.start(spec, str(run_dir))
    run_id = json.loads((run_dir / "run.json").read_text())[MLFLOW_RUN_KEY]
    assert run_id == t.run_id
    for step in (1, 2):
        t.log({"step": step, "loss": 3.0 / step, "lr": 1e-3})
    t.finish(str(export))
    assert log_to_run(spec, str(run_dir), {"eval/perplexity": 7.5}, 2)
    c = MlflowClient(tracking_uri=store)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.preset"] == "gpt-debug"
    assert run.data.params["tracking.mlflow.tracking_uri"] == store
    assert [m.value for m in sorted(c.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == [3.0, 1.5]
    assert run.data.metrics["eval/perplexity"] == 7.5
    assert "export/config.json" in {a.path for a in c.list_artifacts(run_id, "export")}

    # The store goes away mid-run: logging turns itself off after one warning; nothing raises.
    caplog.set_level(logging.WARNING, logger="raybig.train.tracking")
    t2 = RunTracking.for_spec(spec)
    t2.start(spec, str(run_dir))

    class Gone:
        def __getattr__(self, name):
            def fail(*a, **k):
                raise ConnectionError("tracking server went away")
            return fail

    t2.tracker._client = Gone()
    for step in range(1, 6):
        t2.log({"step": step, "loss": 1.0})
    t2.finish(str(export))
    t2.fail()
    assert not t2.tracker.enabled
    assert len([r for r in caplog.records if "tracking disabled" in r.getMessage()]) == 1


def test_raybig_run_refuses_unreachable_store_before_ray(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import raybig.cluster.ray_env as ray_env
    from raybig.cli import main

    started = []
    monkeypatch.setattr(ray_env, "ensure_ray", lambda *a, **k: started.append(1))
    job = tmp_path / "job.yaml"
    job.write_text(f"kind: train\nname: t\nmodel: {{preset: gpt-debug}}\nstorage: {{path: {tmp_path}/runs}}\n"
                   "tracking: {mlflow: {tracking_uri: 'http://127.0.0.1:9'}}\n")
    r = CliRunner().invoke(main, ["run", str(job)])
    assert r.exit_code == 2 and "tracking_uri 'http://127.0.0.1:9' cannot be reached" in r.output, r.output
    assert not started
