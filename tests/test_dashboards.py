"""dashboards/: well-formed Grafana JSON, in sync with its generator, and a valid Prometheus config.

Whether every expression parses and returns data is checked against a real Prometheus in
test_dashboards_prometheus.py.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
import subprocess

import pytest
import yaml

pytestmark = pytest.mark.unit

DASH = pathlib.Path(__file__).resolve().parent.parent / "dashboards"
EXPECTED = {"raybig-training.json", "raybig-sweeps.json", "raybig-serving.json", "raybig-cluster.json"}


def load(name: str) -> dict:
    return json.loads((DASH / name).read_text())


def test_the_four_dashboards_exist_and_match_their_generator():
    assert EXPECTED <= {p.name for p in DASH.glob("*.json")}
    spec = importlib.util.spec_from_file_location("dash_generate", DASH / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for fname, build in gen.DASHBOARDS.items():
        assert load(fname) == json.loads(json.dumps(build())), f"{fname} is stale: run dashboards/generate.py"


def test_panels_are_well_formed():
    uids = set()
    for name in EXPECTED:
        d = load(name)
        assert d["uid"] not in uids and d["title"].startswith("raybig / ")
        uids.add(d["uid"])
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and len(ids) >= 4
        for p in d["panels"]:
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["targets"] and all(t["expr"].strip() and t["refId"] for t in p["targets"])
            assert p["fieldConfig"]["defaults"]["unit"]
            gp = p["gridPos"]
            assert 0 <= gp["x"] and gp["x"] + gp["w"] <= 24
            for t in p["targets"]:
                used = {v for v in variables if f"${v}" in t["expr"]}
                assert used <= set(variables)


def test_training_dashboard_has_job_and_run_variables():
    d = load("raybig-training.json")
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "job_name", "run"]
    titles = {p["title"] for p in d["panels"]}
    assert {"Loss", "Learning rate", "Throughput (tokens/s)", "Step time", "Samples seen", "MFU",
            "Peak memory per worker", "Checkpoint save time (mean)"} <= titles
    exprs = " ".join(t["expr"] for p in d["panels"] for t in p["targets"])
    assert 'run=~"$run"' in exprs and 'job_name=~"$job_name"' in exprs


def test_prometheus_config_uses_rays_service_discovery_file():
    cfg = yaml.safe_load((DASH / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    promtool = shutil.which("promtool")
    if promtool:  # Debian's prometheus package ships it
        r = subprocess.run([promtool, "check", "config", str(DASH / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
