"""The spec layer's shape: one typed union, one path editor, derived values, sizes, and no torch.

Cheap (no Ray). The subprocess test runs `raybig validate` the way a user does and checks that
validation never imports torch (it costs seconds cold and has no business in a YAML check).
"""

from __future__ import annotations

import ast
import json
import math
import pathlib
import subprocess
import sys

import pytest
from pydantic import ValidationError

from raybig.spec import KINDS, JobSpec, SpecError, load_spec, load_spec_text
from raybig.spec.base import MAX_BYTES, QueuedSpec
from raybig.spec.job import ADAPTER
from raybig.spec.memory import EstimateUnavailable, check_fit, count_params
from raybig.spec.models import TrainSpec
from raybig.spec.paths import PathError, edit, set_path, with_values
from raybig.spec.pipeline import PipelineSpec
from raybig.spec.probe import ProbeSpec
from raybig.spec.serve import ServeSpec
from raybig.spec.sweep import SweepSpec

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parent.parent
JOBS = sorted(str(p) for p in (ROOT / "jobs").glob("*.yaml"))


# --- JobSpec: one discriminated union --------------------------------------------------------------


def test_every_job_file_loads_as_its_own_class(tiny_models, monkeypatch):
    monkeypatch.setenv("RAYBIG_MODELS", tiny_models["root"])  # jobs/hf_finetune.yaml, jobs/lora.yaml
    want = {"train": TrainSpec, "sweep": SweepSpec, "serve": ServeSpec, "pipeline": PipelineSpec,
            "probe": ProbeSpec}
    seen = set()
    for path in JOBS:
        spec = load_spec(path)
        assert type(spec) is want[spec.kind], path
        seen.add(spec.kind)
    assert seen == set(want)
    assert dict(KINDS) == want


def test_union_is_validated_by_one_adapter_and_kinds_cannot_be_registered():
    spec = ADAPTER.validate_python({"kind": "probe", "name": "p"})
    assert isinstance(spec, ProbeSpec)
    with pytest.raises(TypeError):
        KINDS["extra"] = TrainSpec  # type: ignore[index]
    assert "JobSpec" in repr(JobSpec) or JobSpec is not None


def test_queued_kinds_share_priority_and_max_retries():
    for cls in (TrainSpec, SweepSpec, ProbeSpec, PipelineSpec):
        assert issubclass(cls, QueuedSpec), cls
    assert not issubclass(ServeSpec, QueuedSpec)  # a Serve app is deployed, not queued
    spec = load_spec_text("kind: probe\nname: p\npriority: 5\nmax_retries: 2\n", env={})
    assert (spec.priority, spec.max_retries) == (5, 2)
    # The shared fields still read last in a frozen spec.
    from raybig.spec import freeze

    assert list(json.loads(json.dumps(spec.model_dump(mode="json"))))[-2:] == ["priority", "max_retries"]
    assert freeze(spec).rstrip().endswith("max_retries: 2")


def test_errors_keep_file_line_path_without_the_union_tag():
    with pytest.raises(SpecError) as e:
        load_spec_text("kind: sweep\nname: s\nbase: {model: {preset: gpt-debug}}\nsearch: {train.lr: 3}\n"
                       "num_sample: 3\n", source="s.yaml", env={})
    (issue,) = e.value.issues
    assert issue.render() == "s.yaml:5: num_sample: unknown key 'num_sample'; did you mean 'num_samples'?"
    with pytest.raises(SpecError) as e:
        load_spec_text("kind: serv\nname: s\n", source="x.yaml", env={})
    assert e.value.issues[0].render().startswith("x.yaml:1: kind: unknown kind 'serv'")
    assert "did you mean 'serve'" in str(e.value)


# --- the dotted-path editor ----------------------------------------------------------------------


def test_set_path_creates_descends_and_refuses():
    data = {"train": {"lr": 1}, "l": [1, {"a": 2}]}
    assert set_path(data, "train.lr", 2) == ("train", "lr")
    assert set_path(data, "x.y.z", 3) == ("x", "y", "z") and data["x"] == {"y": {"z": 3}}
    assert set_path(data, "l.1.a", 5) == ("l", 1, "a") and data["l"][1]["a"] == 5
    assert set_path(data, "d.0", 1) == ("d", "0") and data["d"] == {"0": 1}  # a mapping key stays text
    with pytest.raises(PathError, match="cannot set a key on int"):
        set_path(data, "train.lr.x", 1)
    with pytest.raises(PathError, match="cannot descend into int"):
        set_path(data, "train.lr.x.y", 1)
    with pytest.raises(PathError, match="no section 'nope'"):
        set_path(data, "nope.x", 1, create=False)
    with pytest.raises(PathError, match="empty key segment"):
        set_path(data, "a..b", 1)
    assert with_values({"a": {}}, {"a.b": 1}) == {"a": {"b": 1}}


def test_the_three_editors_are_one():
    """--set, sweep search keys and pipeline set: go through raybig.spec.paths."""
    import raybig.spec.pipeline as pipeline_mod
    import raybig.spec.sweep as sweep_mod
    import raybig.spec.yaml_io as yaml_io

    for mod in (yaml_io, sweep_mod, pipeline_mod):
        src = pathlib.Path(mod.__file__).read_text()
        assert "paths." in src, mod.__name__
    spec = load_spec(str(ROOT / "jobs/debug.yaml"), overrides=["resources.custom.tpu=1"])
    assert spec.resources.custom == {"tpu": 1.0}
    assert edit(spec, {"train.lr": 0.01}).train.lr == 0.01
    with pytest.raises(ValidationError):
        edit(spec, {"train.lr": -1})


# --- derived quantities ------------------------------------------------------------------------


def test_derived_quantities_are_spec_methods():
    spec = load_spec_text("name: d\nmodel: {preset: gpt-debug}\ndata: {seq_len: 64}\n"
                          "train: {micro_batch_size: 4, grad_accum: 3}\n"
                          "resources: {workers: 2, cpus_per_worker: 1.5, gpus_per_worker: 0,\n"
                          "            memory_per_worker: 1GiB, custom: {tpu: 2}}\n", env={})
    assert spec.global_batch() == 4 * 3 * 2
    assert spec.tokens_per_step() == 4 * 3 * 2 * 64
    assert spec.worker_bundle() == {"CPU": 1.5, "tpu": 2.0, "memory": float(2**30)}
    from raybig.scheduler.meta import demand_of
    from raybig.scheduler.probe import bundles_of
    from raybig.spec.deepspeed import build_ds_config

    assert bundles_of(spec.resources) == [spec.worker_bundle()] * 2
    assert demand_of(spec).to_json() == demand_of(spec).to_json()  # builds from the same bundle
    assert build_ds_config(spec)["train_micro_batch_size_per_gpu"] * 3 * 2 == spec.global_batch()


def test_no_copy_of_the_batch_arithmetic_is_left():
    hits = []
    for f in (ROOT / "raybig").rglob("*.py"):
        src = f.read_text()
        for needle in ("micro_batch_size * ", "grad_accum * ", "r.cpus_per_worker), **"):
            if needle in src and f.name != "models.py":
                hits.append(f"{f.relative_to(ROOT)}: {needle}")
    assert not hits, hits


# --- byte sizes (pydantic ByteSize) --------------------------------------------------------------


@pytest.mark.parametrize("text,value", [("8GiB", 8 * 2**30), ("8Gi", 8 * 2**30), ("512MB", 512 * 10**6),
                                        ("1.5G", 1_500_000_000), ("1024", 1024), ("2 KiB", 2048)])
def test_sizes_parse(text, value):
    # A probe: the same ResourcesSpec as train, without the ZeRO fit check.
    spec = load_spec_text(f"kind: probe\nname: m\nresources: {{memory_per_worker: '{text}'}}\n", env={})
    assert spec.resources.memory_per_worker == value and type(spec.resources.memory_per_worker) is int


@pytest.mark.parametrize("raw,msg", [("'lots'", "is not a size"), ("true", "expected a size"), ("-1", "positive"),
                                     ("0", "positive"), (str(2**61), "1 EiB"), ("'99999999TiB'", "1 EiB"),
                                     (".nan", "positive"), (".inf", "1 EiB"), ("'1e400'", "is not a size"),
                                     ("[1]", "expected a size")])
def test_sizes_refused_with_a_helpful_line(raw, msg):
    with pytest.raises(SpecError) as e:
        load_spec_text(f"kind: probe\nname: m\nresources: {{memory_per_worker: {raw}}}\n", source="m.yaml", env={})
    (issue,) = e.value.issues
    assert issue.render().startswith("m.yaml:3: resources.memory_per_worker: ") and msg in issue.message
    assert MAX_BYTES == 2**60 and math.isfinite(MAX_BYTES)


def test_serve_replica_memory_is_a_size_too():
    spec = load_spec_text("kind: serve\nname: s\ncheckpoint: /x\nresources: {memory: 2GiB}\n", env={})
    assert spec.resources.memory == 2 * 2**30


# --- memory estimate: arithmetic only ------------------------------------------------------------


def test_plugin_models_have_no_estimate_and_no_fit_check():
    spec = load_spec(str(ROOT / "jobs/plugin_lstm.yaml"), overrides=["resources.memory_per_worker=1KiB"])
    with pytest.raises(EstimateUnavailable):
        count_params(spec)
    assert check_fit(spec) is None


# --- layering: the spec package is a leaf, and validate never imports torch ----------------------


def test_spec_package_imports_only_leaves():
    allowed = ("raybig.errors", "raybig.tokenizer", "raybig.spec")
    bad = []
    for f in (ROOT / "raybig" / "spec").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "raybig"]
                if node.module == "raybig":
                    names = [f"raybig.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                if (n == "raybig" or n.startswith("raybig.")) and not n.startswith(allowed):
                    bad.append(f"{f.name}: {n}")
                if n.split(".")[0] in ("torch", "ray", "deepspeed"):
                    bad.append(f"{f.name}: {n}")
    assert not bad, bad


def _override_for(path: str) -> str:
    """A memory size for the kind (a sweep's or pipeline's base is a file `--set` cannot reach into)."""
    kind = load_spec(path).kind
    return {"train": "resources.memory_per_worker=64GiB", "probe": "resources.memory_per_worker=64GiB",
            "sweep": "max_concurrent_trials=2", "pipeline": "serve.resources.memory=64GiB",
            "serve": "resources.memory=64GiB"}[kind]


def test_validate_never_imports_torch(tiny_models, monkeypatch):
    monkeypatch.setenv("RAYBIG_MODELS", tiny_models["root"])  # the HF jobs' folders (read without torch)
    cases = [[p] for p in JOBS] + [[p, "--set", _override_for(p)] for p in JOBS]
    script = """
import json, sys
from raybig.cli import main
out = []
for args in json.loads(sys.argv[1]):
    try:
        main.main(args=["validate", *args], standalone_mode=False)
        rc = 0
    except SystemExit as e:
        rc = e.code
    out.append({"args": args, "rc": rc, "torch": "torch" in sys.modules})
print("RESULT " + json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
    assert line, proc.stdout + proc.stderr
    results = json.loads(line[len("RESULT "):])
    assert len(results) == 2 * len(JOBS)
    for r in results:
        assert r["rc"] in (0, None), r
        assert not r["torch"], f"validate {r['args']} imported torch"


def test_no_import_cycle_among_raybig_modules():
    """The layers contract (import-linter) orders packages; this closes the rest: no module of raybig
    imports, directly or through others, a module that imports it back (annotation-only imports
    under TYPE_CHECKING excepted: they never run)."""
    import grimp

    g = grimp.build_graph("raybig", exclude_type_checking_imports=True)
    edges = {m: g.find_modules_directly_imported_by(m) for m in g.modules}
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
