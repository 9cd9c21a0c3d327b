"""Spec loading: every bad input is one clear line with path + line, exit 2, no traceback, nothing started."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from raybig.cli import main
from raybig.spec import SpecError, freeze, load_spec, load_spec_text

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parent.parent

GOOD = """\
kind: train
name: t
model: {preset: gpt-debug}
data: {seq_len: 64}
train:
  steps: 10
  lr: 1.0e-3
deepspeed: {zero_stage: 2}
resources: {workers: 2}
"""


def _issues(text: str, overrides=None, env=None):
    with pytest.raises(SpecError) as e:
        load_spec_text(text, source="job.yaml", overrides=overrides, env=env or {})
    return e.value.issues


BAD = [
    # (description, yaml, expected dotted path, expected line, substring of message)
    ("typo in section", GOOD.replace("train:\n", "trian:\n"), "trian", 5, "did you mean 'train'"),
    ("typo in key", GOOD.replace("  lr:", "  lerning_rate:"), "train.lerning_rate", 7, "did you mean"),
    ("wrong type", GOOD.replace("steps: 10", "steps: ten"), "train.steps", 6, "'ten'"),
    ("negative size", GOOD.replace("steps: 10", "steps: -5"), "train.steps", 6, "greater than"),
    ("negative lr", GOOD.replace("lr: 1.0e-3", "lr: -0.1"), "train.lr", 7, "-0.1"),
    ("unknown kind", GOOD.replace("kind: train", "kind: trian"), "kind", 1, "did you mean 'train'"),
    ("bad preset", GOOD.replace("gpt-debug", "gpt-huge"), "model.preset", 3, "gpt-huge"),
    ("contradiction", GOOD.replace("{zero_stage: 2}", "{zero_stage: 2, offload_param: cpu}"),
     "deepspeed.offload_param", 8, "zero_stage 3"),
    ("seq_len over block", GOOD.replace("seq_len: 64", "seq_len: 4096"), "data.seq_len", 4, "block_size"),
    ("extra contradicts", GOOD.replace("{zero_stage: 2}", "{zero_stage: 2, extra: {zero_optimization: {stage: 3}}}"),
     "deepspeed.extra.zero_optimization.stage", 8, "contradicts deepspeed.zero_stage"),
    ("memory does not fit", GOOD.replace("{workers: 2}", "{workers: 2, memory_per_worker: 1KiB}"),
     "resources.memory_per_worker", 9, "zero_stage: 3"),
    ("fp16 on cpu", GOOD.replace("{zero_stage: 2}", "{zero_stage: 2, precision: fp16}"),
     "deepspeed.precision", 8, "fp16"),
    ("memory storage", GOOD + "storage: {path: 'memory://x'}\n", "storage.path", 10, "memory://"),
    ("missing name", GOOD.replace("name: t\n", ""), "name", None, "required"),
]


@pytest.mark.parametrize("desc,text,path,line,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_names_path_and_line(desc, text, path, line, msg):
    issues = _issues(text)
    hit = [i for i in issues if ".".join(str(p) for p in i.path) == path]
    assert hit, f"{desc}: no issue at {path}: {[i.render() for i in issues]}"
    if line is not None:
        assert hit[0].line == line, hit[0].render()
    assert msg in hit[0].render()
    assert "job.yaml" in hit[0].render()


def test_all_problems_reported_at_once():
    text = GOOD.replace("steps: 10", "steps: -1").replace("lr: 1.0e-3", "lr: x").replace("trian", "x")
    text = text.replace("data: {seq_len: 64}", "data: {seq_len: 64, colour: red}")
    issues = _issues(text)
    paths = {".".join(map(str, i.path)) for i in issues}
    assert {"train.steps", "train.lr", "data.colour"} <= paths


def test_broken_yaml_has_line():
    (issue,) = _issues("kind: train\nname: [unclosed\nmodel: {}\n")
    assert "broken YAML" in issue.message and issue.line is not None


def test_yaml_alias_bomb_refused():
    bomb = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))
    issues = _issues(bomb)
    assert "alias bomb" in issues[0].message


def test_env_interpolation_and_overrides():
    text = GOOD.replace("steps: 10", "steps: ${STEPS}").replace("name: t", "name: ${NAME:-fallback}")
    spec = load_spec_text(text, env={"STEPS": "25"}, overrides=["train.lr=0.01", "deepspeed.zero_stage=3"])
    assert spec.train.steps == 25 and spec.name == "fallback"
    assert spec.train.lr == 0.01 and spec.deepspeed.zero_stage == 3
    (issue,) = _issues(text.replace("${NAME:-fallback}", "x"), env={})
    assert "${STEPS}" in issue.message and issue.line == 6


def test_override_errors_point_at_set():
    issues = _issues(GOOD, overrides=["train.stepz=3"])
    assert issues[0].render().startswith("--set: train.stepz")


def test_secrets_stay_out_of_frozen_spec():
    text = GOOD + "init_from: ${HUB_TOKEN}\n"
    spec = load_spec_text(text, env={"HUB_TOKEN": "s3cr3t-value"})
    assert spec.init_from == "s3cr3t-value"
    frozen = freeze(spec)
    assert "s3cr3t-value" not in frozen and "${HUB_TOKEN}" in frozen


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "jobs").glob("*.yaml")))
def test_every_job_file_validates(path, tiny_models, monkeypatch):
    monkeypatch.setenv("RAYBIG_MODELS", tiny_models["root"])  # jobs/hf_finetune.yaml, jobs/lora.yaml
    result = CliRunner().invoke(main, ["validate", path])
    assert result.exit_code == 0, result.output


def test_cli_bad_spec_exit_2_no_traceback_nothing_started(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("  lr:", "  lerning_rate:") + f"storage: {{path: {tmp_path / 'runs'}}}\n")
    for cmd in (["validate"], ["run"]):
        proc = subprocess.run([sys.executable, "-m", "raybig", *cmd, str(bad)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert f"{bad}:7: train.lerning_rate: unknown key" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_cli_missing_file():
    result = CliRunner().invoke(main, ["validate", "/nonexistent/job.yaml"])
    assert result.exit_code == 2 and "no such file" in result.output


def test_validate_prints_memory_estimate():
    result = CliRunner().invoke(main, ["validate", str(ROOT / "jobs/quickstart.yaml"), "--json"])
    assert result.exit_code == 0
    assert '"params": 853120' in result.output.replace(" ", "").replace('"params":853120', '"params": 853120')


def test_load_spec_file_roundtrip(tmp_path):
    spec = load_spec(str(ROOT / "jobs/quickstart.yaml"))
    p = tmp_path / "frozen.yaml"
    p.write_text(freeze(spec))
    assert load_spec(str(p)) == spec
