"""The cluster configs in `cluster/` parse and hold what their tools require (no network, no cloud).

- Launcher YAML (AWS, GCP): validated with Ray's own schema (`ray/autoscaler/ray-schema.json`), then
  through Ray's `prepare_config` + `validate_config` (defaults merged, as `ray up` does).
- KubeRay manifests: the fields the ray.io/v1 CRDs require (KubeRay 1.x), checked by hand:
  * every kind: apiVersion ray.io/v1, metadata.name
  * RayCluster spec / RayJob spec.rayClusterSpec / RayService spec.rayClusterConfig:
    headGroupSpec.template.spec.containers[] with name + image (rayStartParams a map of strings);
    workerGroupSpecs[] with groupName, minReplicas <= replicas <= maxReplicas, rayStartParams,
    template.spec.containers[] with name + image
  * RayJob: spec.entrypoint (a string)
  * RayService: spec.serveConfigV2 (a YAML string with applications[].import_path)
- And raybig's own contract: the RayJob's spec validates, the RayService's app args are what
  `raybig.serve.app.build_app` accepts.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_passes_rays_schema(name):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / name).read_text())
    schema = json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in gpu)
    assert any("raybig" in c for c in cfg["setup_commands"])  # raybig installed on every node
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    _check_pod(head["template"])
    assert spec["workerGroupSpecs"]
    for g in spec["workerGroupSpecs"]:
        assert isinstance(g["groupName"], str) and g["groupName"]
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert isinstance(g["rayStartParams"], dict)
        _check_pod(g["template"])
    assert spec.get("rayVersion", "2.60.0") == "2.60.0"


def _check_pod(template: dict) -> None:
    cs = template["spec"]["containers"]
    assert cs and all(c["name"] and c["image"] for c in cs)


def test_raycluster_has_crd_fields_and_autoscaler():
    (rc,) = _docs("raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster") and rc["metadata"]["name"]
    _check_cluster_spec(rc["spec"])
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    gpu = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" in gpu


def test_rayjob_runs_a_valid_raybig_spec():
    from raybig.spec import load_spec_text

    docs = _docs("rayjob.yaml")
    job = next(d for d in docs if d["kind"] == "RayJob")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    assert isinstance(job["spec"]["entrypoint"], str) and "raybig" in job["spec"]["entrypoint"]
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]["mountPath"]
    assert head["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    fname = job["spec"]["entrypoint"].split()[-1]
    assert os.path.dirname(fname) == mount and os.path.basename(fname) in cm["data"]
    spec = load_spec_text(cm["data"][os.path.basename(fname)], source="rayjob.yaml")
    assert spec.kind == "train" and spec.resources.gpus_per_worker == 1


def test_rayservice_serves_raybigs_app():
    from raybig.serve.app import DEPLOYMENT
    from raybig.serve.deploy import IMPORT_PATH
    from raybig.serve.http import AppArgs

    (rs,) = _docs("rayservice.yaml")
    assert (rs["apiVersion"], rs["kind"]) == ("ray.io/v1", "RayService")
    _check_cluster_spec(rs["spec"]["rayClusterConfig"])
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == IMPORT_PATH
    AppArgs(**app["args"])  # exactly what build_app accepts
    assert [d["name"] for d in app["deployments"]] == [DEPLOYMENT]
