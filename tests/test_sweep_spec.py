"""`kind: sweep` specs: validation with path + line, search spaces, trial specs, reports from files."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from raybig.cli import main
from raybig.spec import SpecError, load_spec, load_spec_text
from raybig.spec.sweep import trial_data

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parent.parent

GOOD = """\
kind: sweep
name: s
base:
  model: {preset: gpt-debug}
  data: {seq_len: 32}
  train: {steps: 8, micro_batch_size: 4, grad_accum: 2}
  resources: {workers: 2}
search:
  train.lr: {loguniform: [1.0e-5, 3.0e-3]}
  train.micro_batch_size: {choice: [2, 4, 8]}
  deepspeed.zero_stage: {grid: [2, 3]}
num_samples: 4
"""


def issues(text: str) -> list:
    with pytest.raises(SpecError) as e:
        load_spec_text(text, source="sweep.yaml")
    return e.value.issues


def test_good_sweep_loads_with_inline_base():
    spec = load_spec_text(GOOD)
    assert spec.kind == "sweep" and spec.base.kind == "train"
    assert spec.grid_size() == 2 and spec.total_trials() == 4
    assert spec.horizon() == 8  # max_t defaults to the base spec's steps


BAD = [
    # (what, replace this, with this, dotted path, line, message part)
    ("unknown path", "train.lr:", "train.lrr:", "search.train.lrr", 9, "did you mean 'lr'"),
    ("unknown section", "train.lr:", "trian.lr:", "search.trian.lr", 9, "does not exist"),
    ("negative lr", "[1.0e-5, 3.0e-3]", "[-1.0, 3.0e-3]", "search.train.lr.loguniform", 9, "low > 0"),
    ("bad value", "{choice: [2, 4, 8]}", "{choice: [2, 0]}", "search.train.micro_batch_size.choice[1]", 10,
     "fails the train spec's validation"),
    ("bad grid value", "{grid: [2, 3]}", "{grid: [2, 7]}", "search.deepspeed.zero_stage.grid[1]", 11,
     "Input should be 0, 1, 2 or 3"),
    ("uniform lr < 0", "{loguniform: [1.0e-5, 3.0e-3]}", "{uniform: [-0.5, 3.0e-3]}",
     "search.train.lr.uniform[0]", 9, "greater than 0"),
    ("two kinds", "{choice: [2, 4, 8]}", "{choice: [2], grid: [4]}", "search.train.micro_batch_size", 10,
     "exactly one"),
    ("unknown dist", "{choice: [2, 4, 8]}", "{chioce: [2, 4, 8]}", "search.train.micro_batch_size.chioce", 10,
     "unknown key"),
    ("grid too large", "num_samples: 4", "num_samples: 1", "num_samples", 12, "the grid has 2 points"),
    ("name frozen", "train.lr:", "name:", "search.name", 9, "cannot be searched"),
    ("section", "train.lr: {loguniform: [1.0e-5, 3.0e-3]}", "model: 3", "search.model", 9, "is a section"),
    ("low above high", "[1.0e-5, 3.0e-3]", "[3.0e-3, 1.0e-5]", "search.train.lr.loguniform", 9, "below high"),
    ("metric typo", "num_samples: 4", "num_samples: 4\nmetric: val_los", "metric", 13, "did you mean 'val_loss'"),
    ("eval metric, no eval section", "num_samples: 4", "num_samples: 4\nmetric: eval.perplexity", "metric", 13,
     "no eval: section"),
    ("eval metric with ASHA", "  resources: {workers: 2}", "  resources: {workers: 2}\n  eval: {perplexity: true}",
     "metric", None, None),
]


@pytest.mark.parametrize("what,old,new,path,line,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_sweeps_name_path_and_line(what, old, new, path, line, msg):
    assert old in GOOD
    if line is None:  # needs a second edit: an eval metric under ASHA (the default scheduler)
        text = GOOD.replace(old, new, 1).replace("num_samples: 4", "num_samples: 4\nmetric: eval.perplexity")
        old, line, msg = "", 14, "set scheduler: none"
    found = issues(text if not old else GOOD.replace(old, new, 1))
    hits = [i for i in found if i.render().split(": ")[1] == path]
    assert hits, [i.render() for i in found]
    assert hits[0].line == line and msg in hits[0].message, hits[0].render()


def test_sweep_metric_may_name_any_evaluation_result():
    from raybig.spec.sweep import eval_metric_name, metric_names

    text = GOOD.replace("  resources: {workers: 2}", "  resources: {workers: 2}\n  eval: {tasks: [raybig_arith_mc]}")
    for metric, mode in (("eval.perplexity", "min"), ("eval.raybig_arith_mc.acc", "max"), ("val_loss", "min")):
        spec = load_spec_text(f"{text}metric: {metric}\nmode: {mode}\nscheduler: none\n")
        assert spec.metric == metric and metric in metric_names(spec.base)
    assert eval_metric_name("eval/raybig_arith_mc/acc") == "eval.raybig_arith_mc.acc"
    bad = issues(f"{text}metric: eval.raybig_arith_mc.accc\nscheduler: none\n")
    assert bad[0].render().startswith("sweep.yaml:14: metric:") and "did you mean 'eval.raybig_arith_mc.acc'" in \
        bad[0].message
    clf = load_spec_text("kind: sweep\nname: c\nbase: {task: classification, eval: {perplexity: true}}\n"
                         "search: {train.lr: {choice: [0.01, 0.1]}}\nmetric: eval.val_accuracy\nmode: max\n"
                         "scheduler: none\n")
    assert "val_accuracy" in metric_names(clf.base) and "eval.perplexity" not in metric_names(clf.base)


def test_bad_base_value_points_into_base():
    found = issues(GOOD.replace("steps: 8,", "steps: -8,"))
    assert found[0].render().startswith("sweep.yaml:6: base.train.steps:")


def test_algorithm_specific_checks():
    grid_uniform = issues(GOOD.replace("num_samples: 4", "algorithm: grid"))
    assert any("algorithm grid takes" in i.message for i in grid_uniform)
    optuna_grid = issues(GOOD + "algorithm: optuna\n")
    assert any(i.render().startswith("sweep.yaml:11: search.deepspeed.zero_stage.grid") for i in optuna_grid)


def test_base_from_file_beside_the_sweep(tmp_path):
    (tmp_path / "base.yaml").write_text("kind: train\nname: b\nmodel: {preset: gpt-debug}\n"
                                        "data: {seq_len: 32}\ntrain: {steps: 4, lr: -1}\n")
    (tmp_path / "sweep.yaml").write_text("kind: sweep\nname: s\nbase: base.yaml\n"
                                         "search: {train.lr: {grid: [1.0e-3, 2.0e-3]}}\n")
    with pytest.raises(SpecError) as e:  # the base file's own error, with its own line
        load_spec(str(tmp_path / "sweep.yaml"))
    assert e.value.issues[0].render() == f"{tmp_path}/base.yaml:5: train.lr: Input should be greater than 0 (got -1)"
    (tmp_path / "base.yaml").write_text((tmp_path / "base.yaml").read_text().replace("lr: -1", "lr: 1.0e-3"))
    spec = load_spec(str(tmp_path / "sweep.yaml"))
    assert spec.base.name == "b" and spec.base.train.steps == 4
    missing = (tmp_path / "sweep.yaml").read_text().replace("base.yaml", "nope.yaml")
    assert "no train spec file" in issues(missing)[0].message


def test_cli_exit_2_one_line_per_issue_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("train.lr:", "train.lrr:").replace("[2, 4, 8]", "[2, -4]"))
    r = subprocess.run([sys.executable, "-m", "raybig", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    assert f"{bad}:9: search.train.lrr:" in r.stderr
    assert f"{bad}:10: search.train.micro_batch_size.choice[1]:" in r.stderr
    r = subprocess.run([sys.executable, "-m", "raybig", "run", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "nothing was started" in r.stderr


def test_trial_spec_applies_values_and_keeps_global_batch():
    spec = load_spec_text(GOOD + "fixed_global_batch: true\n")
    data = trial_data(spec, {"train.micro_batch_size": 2, "train.lr": 1e-3}, "t1", "/tmp/x")
    assert data["train"]["grad_accum"] == 4 and data["train"]["lr"] == 1e-3  # 4 x 2 == 2 x 4
    assert data["name"] == "t1" and data["storage"] == {"path": "/tmp/x"}
    bad = GOOD.replace("[2, 4, 8]", "[2, 3]") + "fixed_global_batch: true\n"
    assert any("not a multiple" in i.message for i in issues(bad))


def test_param_space_maps_every_distribution():
    from ray import tune

    from raybig.tune.runner import _tune_samples, param_space

    spec = load_spec_text(GOOD.replace(
        "deepspeed.zero_stage: {grid: [2, 3]}",
        "deepspeed.zero_stage: {grid: [2, 3]}\n  train.steps: {randint: [4, 6]}\n"
        "  train.weight_decay: {uniform: [0.0, 0.2]}\n  seed: 7"))
    ps = param_space(spec)
    assert isinstance(ps["train.lr"], tune.search.sample.Float)
    assert ps["train.steps"].lower == 4 and ps["train.steps"].upper == 7  # ours includes high
    assert ps["deepspeed.zero_stage"] == {"grid_search": [2, 3]}
    assert ps["seed"] == 7
    assert _tune_samples(spec) == 2  # 2 samples x 2 grid points = num_samples 4


def test_jobs_sweep_specs_validate():
    for path in sorted((ROOT / "jobs").glob("sweep*.yaml")):
        r = CliRunner().invoke(main, ["validate", str(path)])
        assert r.exit_code == 0, (path, r.output)


def test_report_from_files_alone(tmp_path):
    """`raybig sweep report` reads trial files: states, ranking, table, plot, winner spec."""
    from raybig.spec import freeze
    from raybig.spec.models import TrainSpec
    from raybig.train.export import write_export

    spec = load_spec_text(GOOD.replace("num_samples: 4", f"storage: {{path: {tmp_path}}}"))
    sd = tmp_path / "s"
    (sd / "trials").mkdir(parents=True)
    (sd / "sweep.yaml").write_text(freeze(spec))
    status = {}
    for i, (lr, _steps, vals, state) in enumerate([(1e-3, 8, [5.0, 4.0, 3.0], "terminated"),
                                                  (1e-2, 2, [5.0, 4.8], "terminated"),
                                                  (1e-1, 0, [], "error")]):
        name = f"trial_x_{i}"
        td = sd / "trials" / name
        td.mkdir()
        (td / "trial.json").write_text(json.dumps({"trial_id": f"x_{i}", "params": {"train.lr": lr}, "starts": 1,
                                                   "state": "failed" if state == "error" else "running"}))
        curve = [{"step": s, "val_loss": v, "fresh": True} for s, v in zip(range(0, 9, 4), vals, strict=False)]
        (td / "curve.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curve))
        tspec = TrainSpec.model_validate({**spec.base.model_dump(mode="json"), "name": name})
        (td / "spec.yaml").write_text(freeze(tspec))
        status[name] = {"trial_id": f"x_{i}", "state": state, "config": {"train.lr": lr}}
    write_export(str(sd / "trials" / "trial_x_0"), {}, {"n_layer": 1})
    (sd / "status.json").write_text(json.dumps(status))
    r = CliRunner().invoke(main, ["sweep", "report", str(sd), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert [t["state"] for t in rep["trials"]] == ["finished", "stopped early", "failed"]
    assert rep["best"]["trial"] == "trial_x_0" and rep["best"]["metric"] == 3.0
    best = load_spec(str(sd / "best.yaml"))
    assert best.name == "s-best" and best.init_from == str(sd / "trials" / "trial_x_0" / "export")
    assert (sd / "curves.png").read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(main, ["sweep", "report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not a sweep directory" in r.output


def test_optuna_search_is_seeded_and_takes_our_space():
    from raybig.tune.runner import _search_alg, param_space

    text = GOOD.replace("deepspeed.zero_stage: {grid: [2, 3]}",
                        "deepspeed.zero_stage: 3\n  train.steps: {randint: [4, 6]}") + "algorithm: optuna\nseed: 5\n"
    spec = load_spec_text(text)

    def first_suggestions(n: int) -> list[dict]:
        alg = _search_alg(spec)
        assert alg.set_search_properties("val_loss", "min", param_space(spec))
        return [alg.suggest(f"t{i}") for i in range(n)]

    a, b = first_suggestions(3), first_suggestions(3)
    assert a == b  # same seed, same trials
    assert all(1e-5 <= s["train.lr"] <= 3e-3 and s["train.micro_batch_size"] in (2, 4, 8)
               and 4 <= s["train.steps"] <= 6 for s in a)


def test_sweep_refuses_an_unreachable_tracking_store_before_ray(tmp_path, ray_starts):
    from raybig.errors import TrackingError
    from raybig.tune import run_sweep

    spec = load_spec_text(f"{GOOD}storage: {{path: {tmp_path}}}\n"
                          "tracking: {mlflow: {tracking_uri: 'http://127.0.0.1:9'}}\n")
    assert spec.mlflow().tracking_uri == "http://127.0.0.1:9"
    with pytest.raises(TrackingError, match="cannot be reached") as e:
        run_sweep(spec)
    assert e.value.exit_code == 2 and not ray_starts
