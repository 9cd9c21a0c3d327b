"""A planted secret (`${HUB_TOKEN}`) never reaches a file, a hash or a submitted job, through any path.

The campaign of issue 13: a base train spec reads `init_from` and the sample prompt from
`${HUB_TOKEN}`; a sweep over `train.lr` uses it as `base:`; a pipeline wraps that sweep. Every output
those produce is built with the same functions the runners use (no Ray cluster, no training) and
grepped for the secret: the frozen sweep.yaml/sweep.json, each trial's spec.yaml, best.yaml and the
report files, the pipeline's stage specs, and what `raybig submit` hands to Ray (runtime_env and
metadata). In-process, the spec still holds the real value (training needs it).
"""

from __future__ import annotations

import base64
import copy
import json
import pathlib
import pickle

import pytest
import yaml

from raybig.spec import SpecError, freeze, load_spec, load_spec_text, spec_hash
from raybig.spec.paths import edit
from raybig.spec.secrets import EnvSecret

pytestmark = pytest.mark.unit

SECRET = "s3cr3t-planted-0123456789abcdef"
BASE = """\
kind: train
name: base
model: {preset: gpt-debug}
data: {seq_len: 32}
train: {steps: 8, lr: 1.0e-3, eval_every: 4}
resources: {workers: 2}
init_from: ${HUB_TOKEN}
sample: {prompt: 'def ${HUB_TOKEN}():'}
"""
SWEEP = """\
kind: sweep
name: sw
base: base.yaml
search:
  train.lr: {choice: [0.001, 0.002]}
num_samples: 2
scheduler: asha
grace_period: 2
"""


def _clean(text: str, where: str) -> None:
    assert SECRET not in text, f"{where} holds the secret:\n{text}"
    assert SECRET[:8] not in text, f"{where} holds a prefix of the secret"


def _tree_clean(root: pathlib.Path) -> list[pathlib.Path]:
    files = [p for p in root.rglob("*") if p.is_file()]
    for p in files:
        _clean(p.read_bytes().decode("utf-8", "replace"), str(p))
    return files


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """HUB_TOKEN in the environment; base.yaml and sweep.yaml beside each other."""
    monkeypatch.setenv("HUB_TOKEN", SECRET)
    (tmp_path / "base.yaml").write_text(BASE + f"storage: {{path: {tmp_path / 'runs'}}}\n")
    (tmp_path / "sweep.yaml").write_text(SWEEP + f"storage: {{path: {tmp_path / 'runs'}}}\n")
    return tmp_path


# --- the value type ----------------------------------------------------------------------------


def test_secret_value_is_real_in_process_and_a_reference_in_every_dump(planted):
    spec = load_spec(str(planted / "base.yaml"))
    assert spec.init_from == SECRET and isinstance(spec.init_from, EnvSecret)
    assert spec.sample.prompt == f"def {SECRET}():"
    assert repr(spec.init_from) == "'${HUB_TOKEN}'" and SECRET not in repr(spec)
    assert spec.model_dump()["init_from"] == SECRET  # python mode: in-process use
    dumped = json.dumps(spec.model_dump(mode="json"))
    _clean(dumped, "model_dump(mode='json')")
    assert '"${HUB_TOKEN}"' in dumped and "def ${HUB_TOKEN}():" in dumped
    _clean(freeze(spec), "freeze")


def test_no_copy_loses_the_origin(planted):
    spec = load_spec(str(planted / "base.yaml"))
    copies = {
        "model_copy": spec.model_copy(update={"seed": 7}),
        "python dump -> validate": type(spec).model_validate(spec.model_dump()),
        "paths.edit": edit(spec, {"train.lr": 0.002, "model.kwargs.x": 1}),
        "pickle": pickle.loads(pickle.dumps(spec)),
        "deepcopy": copy.deepcopy(spec),
    }
    for how, c in copies.items():
        assert c.init_from == SECRET and isinstance(c.init_from, EnvSecret), how
        _clean(freeze(c), how)
        assert "${HUB_TOKEN}" in freeze(c), how


def test_hash_does_not_depend_on_the_secret(planted, monkeypatch):
    a = load_spec(str(planted / "base.yaml"))
    monkeypatch.setenv("HUB_TOKEN", "another-value-entirely")
    b = load_spec(str(planted / "base.yaml"))
    assert a.init_from != b.init_from and spec_hash(a) == spec_hash(b)


def test_secret_in_a_non_text_field_or_a_name_is_refused(monkeypatch):
    env = {"HUB_TOKEN": "12"}
    for text, path in [("name: x\ntrain: {steps: '${HUB_TOKEN}'}\n", "train.steps"),
                       ("name: x\nresources: {custom: {gpu_x: '${HUB_TOKEN}'}}\n", "resources.custom.gpu_x"),
                       ("name: x\nresources: {memory_per_worker: '${HUB_TOKEN}GiB'}\n", "resources.memory_per_worker"),
                       ("name: '${HUB_TOKEN}'\n", "name")]:
        with pytest.raises(SpecError) as e:
            load_spec_text(text, env=env)
        issue = e.value.issues[0]
        assert ".".join(map(str, issue.path)) == path and "${HUB_TOKEN}" in issue.message, issue.render()


def test_secret_search_values_are_refused(planted):
    text = SWEEP.replace("{choice: [0.001, 0.002]}", "{choice: [0.001]}\n  sample.prompt: ${HUB_TOKEN}")
    with pytest.raises(SpecError) as e:
        load_spec_text(text, source=str(planted / "sweep.yaml"))
    assert "secrets cannot be searched" in str(e.value) and SECRET not in str(e.value)


def test_set_override_replaces_the_secret_with_a_plain_value(planted):
    spec = load_spec(str(planted / "base.yaml"), overrides=["init_from=/tmp/weights"])
    assert spec.init_from == "/tmp/weights" and not isinstance(spec.init_from, EnvSecret)
    assert "init_from: /tmp/weights" in freeze(spec)


def test_non_secret_variables_are_still_substituted(planted):
    spec = load_spec_text("name: x\nsample: {prompt: '${GREETING}'}\n", env={"GREETING": "hello"})
    assert spec.sample.prompt == "hello" and "prompt: hello" in freeze(spec)


# --- the sweep: frozen spec, trials, best.yaml, report --------------------------------------------


def _fake_finished_trial(sweep, sweep_dir: pathlib.Path, trial_id: str, lr: float, loss: float):
    """What a finished trial leaves behind, written by the same functions a real trial uses."""
    from raybig.spec.sweep import trial_spec
    from raybig.train.runner import write_run_record
    from raybig.tune.trial import TRIAL_JSON, TRIALS_DIR, _align_eval, trial_name

    name = trial_name(trial_id)
    root = f"{sweep_dir}/{TRIALS_DIR}"
    tdir = pathlib.Path(root) / name
    spec = _align_eval(trial_spec(sweep, {"train.lr": lr}, name, root), sweep)
    assert spec.init_from == SECRET  # the trial itself trains with the real value
    assert spec.train.eval_every == 2  # _align_eval put an evaluation on every ASHA rung
    write_run_record(spec, str(tdir))
    (tdir / TRIAL_JSON).write_text(json.dumps({"trial_id": trial_id, "name": name, "params": {"train.lr": lr},
                                               "state": "finished", "starts": 1, "error": None}))
    curve = [{"step": s, "val_loss": loss + (8 - s) * 0.1, "fresh": True, "tokens": s * spec.tokens_per_step()}
             for s in (0, 4, 8)]
    (tdir / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    (tdir / "export").mkdir()
    (tdir / "export" / "config.json").write_text("{}")
    return name


def test_sweep_outputs_hold_no_secret(planted, monkeypatch):
    from raybig.tune.report import write_report
    from raybig.tune.runner import _check_same_sweep, param_space, sweep_dir_of

    sweep = load_spec(str(planted / "sweep.yaml"))
    assert sweep.base.init_from == SECRET
    sweep_dir = pathlib.Path(sweep_dir_of(sweep))
    _check_same_sweep(sweep, str(sweep_dir))  # writes sweep.yaml and sweep.json, as run_sweep does
    assert "${HUB_TOKEN}" in (sweep_dir / "sweep.yaml").read_text()
    _clean(json.dumps(param_space(sweep), default=str), "Tune's param_space")

    status = {}
    for i, (lr, loss) in enumerate([(0.001, 1.5), (0.002, 1.2)]):
        name = _fake_finished_trial(sweep, sweep_dir, f"t{i}", lr, loss)
        status[name] = {"trial_id": f"t{i}", "state": "terminated", "config": {"train.lr": lr}}
        text = (sweep_dir / "trials" / name / "spec.yaml").read_text()
        assert "init_from: ${HUB_TOKEN}" in text
    (sweep_dir / "status.json").write_text(json.dumps(status))

    # `raybig sweep report` later, in a shell without the variable: the report needs no secret.
    monkeypatch.delenv("HUB_TOKEN")
    report = write_report(str(sweep_dir), final=True)
    assert report["best"]["trial"] == "trial_t1"
    best = (sweep_dir / "best.yaml").read_text()
    assert "def ${HUB_TOKEN}():" in best
    files = _tree_clean(sweep_dir)
    assert {"sweep.yaml", "sweep.json", "best.yaml", "best.json", "trials.json", "trials.md"} <= {p.name for p in files}
    _clean(json.dumps(report, default=str), "the sweep report")

    # And `raybig run best.yaml` with the variable set gets the real value back.
    monkeypatch.setenv("HUB_TOKEN", SECRET)
    again = load_spec(str(sweep_dir / "best.yaml"))
    assert again.sample.prompt == f"def {SECRET}():" and again.init_from.endswith("export")


def test_resumed_sweep_hash_is_unchanged_without_the_secret_value(planted, monkeypatch):
    from raybig.tune.runner import _check_same_sweep, sweep_dir_of

    sweep = load_spec(str(planted / "sweep.yaml"))
    _check_same_sweep(sweep, sweep_dir_of(sweep))
    monkeypatch.setenv("HUB_TOKEN", "rotated-token-value")
    _check_same_sweep(load_spec(str(planted / "sweep.yaml")), sweep_dir_of(sweep))  # no SweepMismatch


# --- the pipeline's stages ---------------------------------------------------------------------


def test_pipeline_stage_specs_hold_no_secret(planted):
    from raybig.spec.models import StorageSpec, TrainSpec
    from raybig.spec.yaml_io import load_yaml_text

    text = f"""\
kind: pipeline
name: pl
storage: {{path: {planted / 'runs'}}}
sweep:
  name: pl-sw
  base: base.yaml
  search: {{train.lr: {{choice: [0.001, 0.002]}}}}
  algorithm: grid
  scheduler: none
train:
  set: {{train.steps: 16, sample.prompt: '${{HUB_TOKEN}}'}}
serve:
  host: '${{HUB_TOKEN}}'
"""
    spec = load_spec_text(text, source=str(planted / "pipeline.yaml"))
    _clean(freeze(spec), "frozen pipeline")
    _clean(spec_hash(spec), "pipeline hash")

    # Stage 1: the sweep the pipeline runs (storage moved under the pipeline's directory).
    sweep = spec.sweep.model_copy(update={"storage": StorageSpec(path=str(planted / "runs" / "pl"))})
    assert sweep.base.init_from == SECRET
    _clean(freeze(sweep), "the pipeline's sweep")

    # Stage 2: train the winner: best.yaml (frozen, with ${HUB_TOKEN}) read back + `train.set`.
    best_text = freeze(spec.sweep.base)
    _clean(best_text, "best.yaml")
    best = load_yaml_text(best_text, source="best.yaml").data
    train = TrainSpec.model_validate(spec.train_stage_data(best, str(planted / "runs" / "pl")))
    assert train.init_from == SECRET and train.sample.prompt == SECRET and train.train.steps == 16
    _clean(freeze(train), "the train stage's spec")
    assert "${HUB_TOKEN}" in freeze(train)

    # Stage 3: serve the export.
    serve = spec.serve_spec("/runs/pl/pl-train/export")
    assert serve.host == SECRET
    _clean(freeze(serve), "the serve stage's spec")
    assert "host: ${HUB_TOKEN}" in freeze(serve)


# --- what `raybig submit` sends -----------------------------------------------------------------


class _FakeJobClient:
    def __init__(self):
        self.calls: list[dict] = []

    def submit_job(self, **kw):
        self.calls.append(kw)
        return kw.get("submission_id")


@pytest.mark.parametrize("spec_file", ["base.yaml", "sweep.yaml"])
def test_submit_sends_no_secret(planted, monkeypatch, spec_file):
    from raybig.scheduler import client as client_mod

    fake = _FakeJobClient()
    monkeypatch.setattr(client_mod, "connect", lambda address=None, *a, **k: (fake, "http://fake:8265"))
    spec = load_spec(str(planted / spec_file))
    client_mod.submit(spec, str(planted))
    (call,) = fake.calls
    sent = json.dumps(call, default=str)
    _clean(sent, "submit_job arguments (runtime_env, metadata)")
    env = call["runtime_env"]["env_vars"]
    frozen = base64.b64decode(env["RAYBIG_SPEC_B64"]).decode()
    _clean(frozen, "RAYBIG_SPEC_B64")
    assert "${HUB_TOKEN}" in frozen
    # On the cluster the entrypoint re-reads the frozen spec with the job's own environment.
    rebuilt = load_spec_text(frozen, env={"HUB_TOKEN": SECRET})
    assert spec_hash(rebuilt) == env["RAYBIG_SPEC_HASH"]
    base = rebuilt if rebuilt.kind == "train" else rebuilt.base
    assert base.init_from == SECRET


def test_error_messages_do_not_echo_the_secret(planted):
    text = BASE.replace("init_from: ${HUB_TOKEN}", "storage: {path: 'memory://${HUB_TOKEN}'}")
    with pytest.raises(SpecError) as e:
        load_spec_text(text)
    _clean(str(e.value), "the error message")
    assert yaml.safe_load(freeze(load_spec_text(BASE)))["init_from"] == "${HUB_TOKEN}"
