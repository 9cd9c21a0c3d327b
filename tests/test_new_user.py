"""What a new user trips on (issue 20, items 2, 4, 5, 6), each through the real CLI.

One line, the exit code, no traceback. Only `test_changed_spec_under_an_old_name_end_to_end` starts
Ray (gpt-debug, 1 worker, a few steps); everything else runs on files alone.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

from raybig.cli import main
from raybig.spec import freeze, load_spec

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEBUG = str(ROOT / "jobs" / "debug.yaml")


def _one_line_error(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error ")]
    assert len(errors) == 1, res.output
    return errors[0]


# --- item 4: validate catches what it can ----------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("override, words", [
    ("model.target=my_models.nope:build", ["no module 'my_models.nope'"]),
    ("model.target=nopkg.mod:build", ["cannot import 'nopkg.mod'"]),
    ("model.target=my_models.lstm_lm:bild", ["has no 'bild'", "did you mean 'build'"]),
    ("model.kwargs.hiden=3", ["model.kwargs", "unexpected keyword argument 'hiden'", "vocab_size, hidden, layers"]),
])
def test_validate_refuses_a_plugin_target_that_does_not_exist(override, words):
    res = CliRunner().invoke(main, ["validate", str(ROOT / "jobs" / "plugin_lstm.yaml"), "--set", override])
    line = _one_line_error(res)
    assert "model." in line and all(w in line for w in words), line


@pytest.mark.unit
def test_plugin_check_names_the_line_and_never_imports_torch(tmp_path):
    (tmp_path / "mymod.py").write_text("import torch\n\ndef build(vocab_size, width=8):\n    return None\n")
    (tmp_path / "job.yaml").write_text("kind: train\nname: p\nmodel:\n  target: mymod:build\n"
                                       "  kwargs: {depth: 2}\n")
    script = ("import sys\nfrom raybig.cli import main\n"
              "try:\n    main.main(args=['validate', sys.argv[1]], standalone_mode=False)\n"
              "except SystemExit as e:\n    print('RC', e.code)\n"
              "print('TORCH', 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "job.yaml")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "RC 2" in out and "TORCH False" in out, out
    assert "job.yaml:5: model.kwargs:" in out and "unexpected keyword argument 'depth'" in out, out


@pytest.mark.unit
def test_plugin_forward_may_return_loss_tuple_or_output_object():
    import torch

    from raybig.plugins import loss_of

    loss = torch.tensor(1.5)
    assert loss_of(loss) is loss
    assert loss_of((torch.zeros(2, 3, 5), loss)) is loss  # nanoGPT: (logits, loss)

    class Out:
        def __init__(self):
            self.loss, self.logits = loss, torch.zeros(1)

    assert loss_of(Out()) is loss  # Hugging Face: ModelOutput.loss
    with pytest.raises(TypeError, match=r"shape \(2, 3\)"):
        loss_of(torch.zeros(2, 3))


@pytest.mark.unit
def test_field_and_cross_field_errors_come_together(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("kind: train\nname: t\nmodel: {preset: gpt-debug}\ndata: {seq_len: 256, bogus: 1}\n"
                 "train: {steps: -3}\n")
    res = CliRunner().invoke(main, ["validate", str(p)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "data.bogus: unknown key" in res.output
    assert "train.steps:" in res.output
    assert "data.seq_len: seq_len=256 exceeds the model's block_size=128" in res.output  # the cross-field one
    assert "3 problems" in res.output


@pytest.mark.unit
def test_env_var_inside_a_flow_mapping_gets_a_hint_to_quote_it(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("kind: train\nname: t\ntrain: {lr: ${LR}, steps: 3}\n")
    res = CliRunner().invoke(main, ["validate", str(p)], env={"LR": "1e-3"})
    line = _one_line_error(res)
    assert "job.yaml:3" in line and 'must be quoted: "${LR}"' in line, line
    p.write_text('kind: train\nname: t\ntrain: {lr: "${LR}", steps: 3}\n')
    assert load_spec(str(p), env={"LR": "1e-3"}).train.lr == 1e-3


@pytest.mark.unit
def test_memory_beyond_the_machine_is_warned_with_fixes_that_shrink_it():
    from raybig.spec.summary import machine_memory_warnings

    spec = load_spec(DEBUG, ["model.preset=gpt-1.3b", "deepspeed.zero_stage=0"])
    (w,) = machine_memory_warnings(spec, total=24 * 2**30)
    assert "18.1 GiB per worker x 2 workers" in w and "24.0 GiB" in w, w
    # At ZeRO-0 every worker holds everything: more workers never help; fewer, or a higher stage, do.
    assert "resources.workers: 4" not in w and "resources.workers: 1" in w and "zero_stage: 3" in w, w
    assert "offload_optimizer" not in w, w  # on CPU, offloading moves state within the same RAM
    assert machine_memory_warnings(spec.model_copy(update={"resources": spec.resources.model_copy(
        update={"memory_per_worker": 64 * 2**30})}), total=24 * 2**30) == []
    assert machine_memory_warnings(load_spec(DEBUG), total=24 * 2**30) == []


@pytest.mark.unit
def test_memory_per_worker_advice_names_only_fixes_that_shrink_it():
    res = CliRunner().invoke(main, ["validate", DEBUG, "--set", "model.preset=gpt-1.3b", "--set",
                                    "deepspeed.zero_stage=0", "--set", "resources.memory_per_worker=8GiB"])
    line = _one_line_error(res)
    assert "zero_stage: 1" in line and "resources.workers" not in line, line


# --- item 5: output a script and a narrow terminal can use ------------------------------------------


@pytest.mark.unit
def test_validate_json_for_a_bad_spec_is_json_too(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("kind: train\nname: t\ntrain: {lr: -1, stepz: 3}\n")
    res = CliRunner().invoke(main, ["validate", str(p), "--json"])
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc["ok"] is False
    assert {(i["path"], i["line"]) for i in doc["issues"]} == {("train.lr", 3), ("train.stepz", 3)}
    ok = CliRunner().invoke(main, ["validate", DEBUG, "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"] is True


@pytest.mark.unit
def test_narrow_terminal_keeps_ids_rates_and_paths_whole():
    from raybig.cli.progress import print_train_summary
    from raybig.cli.sweep import print_report
    from raybig.train.result import TrainResult

    long_dir = "/home/someone/projects/experiments/" + "a-rather-long-folder-name/" * 3 + "runs/debug"
    buf = io.StringIO()
    con = Console(file=buf, width=80, highlight=False)
    print_train_summary(con, TrainResult(name="debug", run_dir=long_dir, steps=8, seconds=3.0,
                                         export_dir=long_dir + "/export"))
    assert long_dir in buf.getvalue() and f"{long_dir}/export" in buf.getvalue()
    rep = {"sweep": "s", "metric": "val_loss", "total_steps": 16, "curves": long_dir + "/curves.png", "best": None,
           "trials": [{"trial": f"trial_4ec1a_0000{i}", "state": "stopped early", "steps": 8, "metric": 2.3456,
                       "best": 2.3, "params": {"train.lr": 0.00123456 * (i + 1), "train.micro_batch_size": 4,
                                               "deepspeed.zero_stage": 2}} for i in range(2)]}
    buf = io.StringIO()
    print_report(rep, Console(file=buf, width=80, highlight=False))
    text = buf.getvalue()
    for whole in ("trial_4ec1a_00000", "trial_4ec1a_00001", "0.001235", "0.002469", "stopped early",
                  long_dir + "/curves.png", "best"):
        assert whole in text, text


@pytest.mark.unit
def test_run_json_holds_the_result_and_timings(tmp_path):
    from raybig.train.result import RUN_FILE, TrainResult, write_result

    run_dir = str(tmp_path / "r")
    os.makedirs(run_dir)
    (tmp_path / "r" / RUN_FILE).write_text(json.dumps({"name": "r", "kind": "train", "spec_hash": "abc"}))
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 2.0, "val_loss": 2.1}) + "\n")
    res = TrainResult.from_history("r", run_dir, [{"step": 4, "loss": 2.0, "val_loss": 2.1}], seconds=12.5,
                                   seconds_to_first_step=7.0, resumed_from_step=2)
    write_result(run_dir, res)
    doc = json.loads((tmp_path / "r" / RUN_FILE).read_text())
    assert doc["spec_hash"] == "abc" and doc["result"]["seconds"] == 12.5
    back = TrainResult.from_run_dir(run_dir)
    assert (back.seconds, back.seconds_to_first_step, back.resumed_from_step) == (12.5, 7.0, 2)


# --- item 2: a changed spec under an old name (files only; the Ray run is below) ---------------------


def _fake_run(tmp_path, steps_done: int, export: bool, **sets: object) -> tuple[str, str]:
    """A run directory as a finished or interrupted `raybig run jobs/debug.yaml` leaves it."""
    storage = str(tmp_path / "runs")
    spec = load_spec(DEBUG, [f"storage.path={storage}", *[f"{k}={v}" for k, v in sets.items()]])
    run = tmp_path / "runs" / "debug"
    ck = run / "checkpoint_2026-01-01_00-00-00.000000"
    ck.mkdir(parents=True)
    (ck / "raybig-manifest-rank0.json").write_text(json.dumps({"rank": 0, "world_size": 2, "step": steps_done,
                                                               "files": {}}))
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": ck.name}],
         "latest_checkpoint_result": {"checkpoint_dir_name": ck.name}}))
    (run / "spec.yaml").write_text(freeze(spec))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0, "val_loss": 3.1}) + "\n"
                                               for s in range(0, steps_done + 1, 2)))
    if export:
        (run / "export").mkdir()
        (run / "export" / "config.json").write_text("{}")
    return storage, str(run / "spec.yaml")


@pytest.mark.unit
def test_a_spec_the_checkpoint_cannot_carry_is_one_line_and_leaves_spec_yaml(tmp_path, ray_starts):
    storage, spec_yaml = _fake_run(tmp_path, 8, export=True)
    before = pathlib.Path(spec_yaml).read_text()
    t0 = time.time()
    res = CliRunner().invoke(main, ["run", DEBUG, "--set", f"storage.path={storage}", "--set",
                                    "model.preset=gpt-tiny", "--set", "train.steps=12"])
    line = _one_line_error(res)
    assert "model.preset (gpt-debug -> gpt-tiny)" in line and "new `name`" in line and "init_from" in line, line
    assert "train.steps" not in line  # a carried change is not blamed
    assert pathlib.Path(spec_yaml).read_text() == before
    assert not ray_starts and time.time() - t0 < 30
    # (resources.workers is carried: another worker count converts the checkpoint, raybig.train.universal)
    for override, field in [("deepspeed.zero_stage=3", "deepspeed.zero_stage")]:
        res = CliRunner().invoke(main, ["run", DEBUG, "--set", f"storage.path={storage}", "--set", override])
        assert field in _one_line_error(res)


@pytest.mark.unit
def test_rerunning_a_finished_run_says_it_is_complete(tmp_path, ray_starts):
    storage, _ = _fake_run(tmp_path, 8, export=True)
    res = CliRunner().invoke(main, ["run", DEBUG, "--set", f"storage.path={storage}"])
    assert res.exit_code == 0, res.output
    assert "'debug' is complete" in res.output and "nothing was run" in res.output, res.output
    assert "nan" not in res.output and not ray_starts
    js = CliRunner().invoke(main, ["run", DEBUG, "--set", f"storage.path={storage}", "--json"])
    assert js.exit_code == 0 and json.loads(js.stdout)["resumed_from_step"] == 8


@pytest.mark.unit
def test_extending_steps_resumes_and_says_how_the_learning_rate_continues(tmp_path):
    from raybig.train.compat import check_resume_compatible, lr_ratio

    storage, _ = _fake_run(tmp_path, 8, export=True)
    spec = load_spec(DEBUG, [f"storage.path={storage}", "train.steps=12", "train.eval_every=6"])
    plan = check_resume_compatible(spec, f"{storage}/debug")
    assert plan.resume_step == 8 and not plan.complete and plan.changed == ["train.eval_every", "train.steps"]
    text = "\n".join(plan.notes)
    assert "resuming 'debug' from step 8" in text
    # The old 8-step cosine ended at the floor: the extension continues there, no warm restart
    # (the 12-step cosine re-stretched would have been higher at step 8).
    floor = 1e-3 * spec.train.min_lr_ratio
    assert 1e-3 * lr_ratio(8, 12, 2, spec.train.min_lr_ratio) > floor
    assert plan.schedule_from is not None and plan.schedule_from.step == 8
    assert plan.schedule_from.ratio == pytest.approx(spec.train.min_lr_ratio)
    assert f"continues from {floor:.3g} at step 8 and stays at {floor:.3g}" in text, text
    # Queueing fields are the scheduler's, not the checkpoint's: changing them resumes.
    queued = check_resume_compatible(load_spec(DEBUG, [f"storage.path={storage}", "priority=7", "max_retries=1",
                                                       "preemptible=false"]), f"{storage}/debug")
    assert queued.resume_step == 8 and queued.changed == ["max_retries", "preemptible", "priority"]
    # No checkpoint at all: the run starts over, whatever changed.
    fresh = check_resume_compatible(load_spec(DEBUG, [f"storage.path={tmp_path}/none"]), f"{tmp_path}/none/debug")
    assert fresh.resume_step is None and not fresh.notes


# --- item 6: examples that do what they say --------------------------------------------------------


@pytest.mark.unit
def test_grid_enumerates_choice_values_and_the_pipeline_example_runs_two_trials():
    from raybig.spec import load_spec_text
    from raybig.tune.runner import param_space

    pipe = load_spec(str(ROOT / "jobs" / "serve_pipeline.yaml"))
    assert pipe.sweep.total_trials() == 2
    sweep = load_spec_text(f"kind: sweep\nname: s\nbase: {DEBUG}\nalgorithm: grid\nscheduler: none\n"
                           "search:\n  train.lr: {choice: [1.0e-3, 3.0e-3]}\n  train.warmup_steps: {grid: [1, 2]}\n")
    assert sweep.grid_size() == 4 and sweep.total_trials() == 4
    assert param_space(sweep)["train.lr"] == {"grid_search": [1e-3, 3e-3]}
    rnd = sweep.model_copy(update={"algorithm": "random"})
    assert rnd.grid_size() == 2 and "grid_search" not in str(param_space(rnd)["train.lr"])


@pytest.mark.unit
def test_a_changed_sweep_under_the_same_name_is_one_line_before_ray(tmp_path, ray_starts):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"kind: sweep\nname: s\nbase: {DEBUG}\nscheduler: none\nnum_samples: 1\n"
                     f"storage: {{path: {tmp_path}/runs}}\nsearch:\n  train.lr: {{choice: [1.0e-3]}}\n")
    d = tmp_path / "runs" / "s"
    d.mkdir(parents=True)
    old = load_spec(str(sweep), ["seed=5"])
    (d / "sweep.yaml").write_text(freeze(old))
    (d / "sweep.json").write_text(json.dumps({"name": "s", "kind": "sweep", "spec_hash": "0123456789ab"}))
    res = CliRunner().invoke(main, ["run", str(sweep)])
    line = _one_line_error(res)
    assert "seed changed" in line and "new name" in line, line
    assert not ray_starts


@pytest.mark.unit
def test_a_foreground_server_ends_when_its_app_is_removed(monkeypatch):
    from raybig.serve import local
    from raybig.spec.serve import ServeSpec

    monkeypatch.setattr(local, "start_serve", lambda spec, address: {"name": spec.name, "embedded": False,
                                                                    "dashboard": "http://x"})
    looks = iter([True, True, False])
    monkeypatch.setattr(local, "app_present", lambda name: next(looks))
    deleted: list[str] = []
    monkeypatch.setattr(local, "delete_app", lambda name, dash: deleted.append(name))
    notes: list[str] = []
    spec = ServeSpec.model_validate({"name": "app", "checkpoint": "/nowhere"})
    res = local.run_serve(spec, on_note=notes.append, poll_s=0.01)
    assert res["removed"] and deleted == [] and "was removed" in notes[0]


# --- the one test that starts Ray ---------------------------------------------------------------


@pytest.mark.ray
def test_changed_spec_under_an_old_name_end_to_end(tmp_path):
    """run 4 steps; a changed model is refused; more steps resume from 4; a rerun says complete."""
    base = [sys.executable, "-m", "raybig", "run", DEBUG, "--set", f"storage.path={tmp_path}/runs", "--set",
            "resources.workers=1", "--set", "sample.max_new_tokens=0", "--set", "checkpoint.every=4"]
    env = {**os.environ, "RAY_ADDRESS": "", "COLUMNS": "80"}

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)

    first = run("--set", "train.steps=4", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    spec_yaml = tmp_path / "runs" / "debug" / "spec.yaml"
    recorded = spec_yaml.read_text()
    assert yaml.safe_load(recorded)["train"]["steps"] == 4
    assert json.loads((tmp_path / "runs" / "debug" / "run.json").read_text())["result"]["seconds"] > 0

    bad = run("--set", "model.preset=gpt-tiny", "--set", "train.steps=8")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "model.preset" in bad.stderr and "init_from" in bad.stderr
    assert spec_yaml.read_text() == recorded

    more = run("--set", "train.steps=8")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming 'debug' from step 4" in more.stderr and "learning rate" in more.stderr, more.stderr
    assert "resumed from step 4" in more.stderr
    doc = json.loads((tmp_path / "runs" / "debug" / "run.json").read_text())
    assert doc["result"]["steps"] == 8 and doc["result"]["resumed_from_step"] == 4

    again = run("--set", "train.steps=8")
    assert again.returncode == 0 and "is complete" in again.stderr and "nan" not in again.stderr, again.stderr
