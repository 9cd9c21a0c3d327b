"""`task: custom`: a user's model (`forward(batch)` -> loss and named metrics) and dataset (`data.target`)
trained through Ray Train + DeepSpeed; the contract's shapes, sharding and exact resume; validation."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from raybig.errors import TaskError
from raybig.spec import SpecError, load_spec, load_spec_text
from raybig.train.plugin_task import DatasetBatches, loss_and_metrics_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = str(ROOT / "jobs" / "plugin_custom.yaml")


@pytest.mark.unit
def test_forward_may_return_loss_tuple_dict_or_loss_attribute():
    loss = torch.tensor(2.0, requires_grad=True)
    assert loss_and_metrics_of(loss) == (loss, {})
    assert loss_and_metrics_of((loss, {"acc": torch.tensor(0.5), "n": 3}))[1] == {"acc": 0.5, "n": 3.0}
    got, m = loss_and_metrics_of({"loss": loss, "acc": 0.25, "logits": torch.zeros(4, 2)})
    assert got is loss and m == {"acc": 0.25}  # non-scalar entries are not metrics

    class Out:
        pass

    o = Out()
    o.loss = loss  # type: ignore[attr-defined]
    assert loss_and_metrics_of(o) == (loss, {})
    for bad, words in ((torch.zeros(3), "returned Tensor"), ({"acc": 1.0}, "returned dict"),
                       ((loss, {"acc": torch.zeros(2)}), "numbers or 0-dim"), ((torch.zeros(2), {}), "loss of type")):
        with pytest.raises(TaskError, match=words):
            loss_and_metrics_of(bad)


@pytest.mark.unit
def test_batches_shard_ranks_cover_epochs_and_are_a_function_of_the_step():
    world, n, mb, accum = 2, 103, 5, 2
    ranks = [DatasetBatches(n, 12, mb, accum, seed=7, rank=r, world_size=world, eval_batches=3) for r in range(world)]
    share = n // world
    steps = share // (mb * accum)  # whole steps inside epoch 0
    seen = [np.concatenate([b.indices(s, m) for s in range(steps) for m in range(accum)]) for b in ranks]
    flat = np.concatenate(seen)
    assert len(set(flat.tolist())) == len(flat)  # within an epoch: no example twice, no rank overlap
    # Exact resume: a fresh object (a restarted worker) gives the same batch for the same (step, micro).
    again = DatasetBatches(n, 12, mb, accum, seed=7, rank=1, world_size=world, eval_batches=3)
    assert np.array_equal(again.indices(9, 1), ranks[1].indices(9, 1))
    assert not np.array_equal(ranks[1].indices(9, 1), ranks[1].indices(9, 0))
    # Validation: every example once per evaluation, over ranks and chunks.
    val = np.concatenate([b.val_batch(i)[0].numpy() for b in ranks for i in range(3)])
    assert sorted(val.tolist()) == list(range(12))
    with pytest.raises(TaskError, match="cannot fill"):
        DatasetBatches(n, 5, mb, accum, 0, 0, world, eval_batches=3)


@pytest.mark.unit
def test_custom_task_validation_names_the_field():
    base = "kind: train\nname: c\ntask: custom\nmodel: {target: 'plugins.sine:build_model'}\n"
    with pytest.raises(SpecError, match="data.target: task: custom needs"):
        load_spec_text(base)
    with pytest.raises(SpecError, match="task: data.target .* not causal_lm"):
        load_spec_text("kind: train\nname: c\ndata: {target: 'plugins.sine:build_dataset'}\n")
    from click.testing import CliRunner

    from raybig.cli import main

    res = CliRunner().invoke(main, ["validate", SPEC, "--set", "data.kwargs.colour=red"])
    assert res.exit_code == 2 and "data.kwargs: plugins.sine:build_dataset refuses these arguments" in res.output
    spec = load_spec(SPEC)
    assert spec.task == "custom" and spec.data.kwargs == {"examples": 2048, "noise": 0.05}


@pytest.mark.ray
def test_custom_model_and_dataset_train_through_deepspeed(ray_local, tmp_path, one_torch_thread, monkeypatch):
    from raybig.train.export import load_model
    from raybig.train.runner import run_train

    spec = load_spec(SPEC, [f"storage.path={tmp_path}", "train.steps=40", "train.eval_every=40",
                            "checkpoint.every=40", "resources.cpus_per_worker=0.5"])
    res = run_train(spec, python_path=[str(ROOT / "jobs")])
    h = res.history
    trained = [r for r in h if "loss" in r]
    assert res.steps == 40 and trained and all("mae" in r for r in trained)  # the model's own metric
    assert trained[-1]["loss"] < 0.5 * trained[0]["loss"], [r["loss"] for r in trained]
    vals = [r for r in h if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 40] and vals[-1]["val_loss"] < 0.5 * vals[0]["val_loss"]
    assert vals[-1]["val_mae"] < vals[0]["val_mae"]
    # The export is the plug-in model, rebuilt by its own factory (importable here as on the workers).
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    model, meta = load_model(res.export_dir)
    assert meta["model"]["target"] == "plugins.sine:build_model" and type(model).__name__ == "SineRegressor"
