"""`task: custom`: a user's model and dataset (plug-ins) trained through the same Ray Train + DeepSpeed loop.

The contract (also in the README's "Plug-ins" paragraph):

- `data.target: "pkg.mod:factory"` returns a **map-style dataset**: `len(ds)` and `ds[i]` for
  `0 <= i < len(ds)`, each item ONE example (a tensor, a number, a numpy array, or a dict / tuple /
  list of them). The factory gets `data.kwargs`, plus `split="train"` / `split="val"` and `seed` (the
  spec's) when its signature names them (or takes `**kwargs`). Called with `split="val"`, it may
  return None (no validation: no val_loss). Without a `split` parameter the dataset is training data
  only.
- `model.target: "pkg.mod:factory"` returns a `torch.nn.Module` whose `forward(batch)` takes one
  micro batch: `train.micro_batch_size` examples collated by `torch.utils.data.default_collate`
  (tensors stacked on a new first dim, numbers to a 1-D tensor, dicts and tuples kept), every
  tensor on the worker's device. It returns the mean loss of the batch as a scalar tensor, and
  optionally named metrics, in one of these shapes:
    * `loss`
    * `(loss, {"acc": value, ...})`
    * `{"loss": loss, "acc": value, ...}` (every other scalar entry is a metric)
    * an object with `.loss` (a Hugging Face `ModelOutput`; no metrics)
  A metric value is a Python number or a 0-dim tensor. Metrics are averaged like the loss (over
  micro steps, log steps and ranks) and reported beside it (`acc`), and as `val_acc` beside
  `val_loss`.

Sharding and exact resume (`DatasetBatches`): every epoch is a permutation of the training indices
seeded by (seed, epoch), the same on every rank; rank r of w reads the r-th of w equal contiguous
slices of it (the `len % w` examples left over are skipped that epoch). Micro step m of step s is
the rank's next `micro_batch_size` positions, position `(s * grad_accum + m) * micro_batch_size` of
its endless epoch stream, so a batch is a function of (seed, rank, world size, step, micro) alone,
and a run resumed at step N reads exactly the batches it would have read. The validation dataset is
split into w contiguous rank shares, each into `train.eval_batches` chunks: one evaluation covers
every validation example once.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raybig.errors import TaskError

TRAIN, VAL = 0, 1
"""Split ids the loop's `y` carries to `PluginTask` (the loop's `x` carries example indices)."""


def _load(target: str) -> Any:
    from raybig.train.built import load_target

    return load_target(target)


def _is_dataset(ds: Any) -> bool:
    return hasattr(ds, "__len__") and hasattr(ds, "__getitem__")


_loaded: dict[str, tuple[Any, Any]] = {}
"""The last datasets loaded in this process, by spec identity (the model's task and the batches share them)."""


def load_datasets(spec: Any) -> tuple[Any, Any]:
    """(train, val or None): what `data.target` returns for `split="train"` and `split="val"`.

    Loaded once per process for the same (target, kwargs, seed).

    Raises:
        TaskError: the factory returned something that is not a non-empty map-style dataset.
    """
    key = repr((spec.data.target, sorted(spec.data.kwargs.items()), spec.seed))
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = _load_datasets(spec)
    return _loaded[key]


def _load_datasets(spec: Any) -> tuple[Any, Any]:
    target = spec.data.target
    fn = _load(target)
    params = inspect.signature(fn).parameters
    any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = dict(spec.data.kwargs)
    if ("seed" in params or any_kw) and "seed" not in kwargs:
        kwargs["seed"] = spec.seed
    takes_split = "split" in params or any_kw
    train = fn(split="train", **kwargs) if takes_split else fn(**kwargs)
    val = fn(split="val", **kwargs) if takes_split else None
    splits: tuple[tuple[str, Any], ...] = (("train", train), ("val", val))
    for name, ds in splits:
        if ds is None and name == "val":
            continue
        if not _is_dataset(ds):
            raise TaskError(f"data.target {target!r} (split={name}) returned {type(ds).__name__}, not a map-style "
                            "dataset (len(ds) and ds[i])")
        if len(ds) == 0 and name == "train":
            raise TaskError(f"data.target {target!r} returned an empty training dataset")
    if val is not None and len(val) == 0:
        val = None
    return train, val


@dataclass
class _IndexBatch:
    """One micro batch as the loop feeds it: `x` the example indices (int64 (B,)), `y` the split (int64 (B,))."""

    x: np.ndarray
    y: np.ndarray
    positions: None = None
    doc_ids: None = None


class DatasetBatches:
    """Example indices for one rank, with the interface of the loop's other batch streams (see module doc).

    Args:
        n_train: training examples.
        n_val: validation examples (0: none).
        micro_batch_size: examples per micro batch.
        grad_accum: micro batches per step.
        seed: the spec's seed.
        rank, world_size: this worker and how many there are.
        eval_batches: validation chunks per evaluation (`train.eval_batches`).

    Raises:
        TaskError: fewer training examples than workers, or validation examples than
            workers x eval_batches.
    """

    packed = False
    """Never packed (the loop asks)."""

    def __init__(self, n_train: int, n_val: int, micro_batch_size: int, grad_accum: int, seed: int, rank: int,
                 world_size: int, eval_batches: int):
        self.share = n_train // world_size
        if self.share < 1:
            raise TaskError(f"{n_train} training examples for {world_size} workers")
        if n_val and n_val < world_size * eval_batches:
            raise TaskError(f"{n_val} validation examples cannot fill {eval_batches} eval batches on each of "
                            f"{world_size} workers (lower train.eval_batches)")
        self.n_train, self.n_val = n_train, n_val
        self.micro_batch_size, self.grad_accum, self.seed = micro_batch_size, grad_accum, seed
        self.rank, self.world_size, self.eval_batches = rank, world_size, eval_batches
        self._epoch: tuple[int, np.ndarray] | None = None
        val = np.array_split(np.arange(n_val), world_size)[rank] if n_val else np.arange(0)
        self.val_chunks = np.array_split(val, eval_batches) if n_val else []

    @property
    def has_val(self) -> bool:
        """Whether there is a validation dataset (the loop then reports val_loss)."""
        return self.n_val > 0

    def _epoch_share(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_train)
            self._epoch = (epoch, perm[self.rank * self.share:(self.rank + 1) * self.share])
        return self._epoch[1]

    def indices(self, step: int, micro: int) -> np.ndarray:
        """The training example indices of micro step `micro` of `step` on this rank (int64 (B,))."""
        start = (step * self.grad_accum + micro) * self.micro_batch_size
        out = np.empty(self.micro_batch_size, dtype=np.int64)
        for i in range(self.micro_batch_size):
            epoch, pos = divmod(start + i, self.share)
            out[i] = self._epoch_share(epoch)[pos]
        return out

    def get(self, step: int, micro: int) -> _IndexBatch:
        """`indices(step, micro)` in the shape the loop feeds (`x` indices, `y` the train split)."""
        idx = self.indices(step, micro)
        return _IndexBatch(idx, np.full_like(idx, TRAIN))

    def val_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk `i` (of `eval_batches`) of this rank's validation indices, and the val split."""
        idx = torch.from_numpy(self.val_chunks[i % self.eval_batches].astype(np.int64))
        return idx, torch.full_like(idx, VAL)


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in a (nested dict / tuple / list) batch moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _scalar(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, int | float) or (isinstance(v, torch.Tensor) and v.ndim == 0)


def loss_and_metrics_of(out: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics) from what a plug-in's `forward(batch)` returned, in any shape the contract allows.

    Raises:
        TaskError: none of the accepted shapes (the message says what came back).
    """
    loss: Any = None
    metrics: dict[str, Any] = {}
    if isinstance(out, torch.Tensor) and out.ndim == 0:
        loss = out
    elif isinstance(out, tuple | list) and len(out) == 2 and isinstance(out[1], Mapping):
        loss, metrics = out[0], dict(out[1])
    elif isinstance(out, Mapping) and "loss" in out:
        loss = out["loss"]
        metrics = {k: v for k, v in out.items() if k != "loss" and _scalar(v)}
    elif getattr(out, "loss", None) is not None:
        loss = out.loss
    if not (isinstance(loss, torch.Tensor) and loss.ndim == 0):
        what = type(out).__name__ if loss is None else f"a loss of type {type(loss).__name__}"
        raise TaskError(f"a plug-in's forward(batch) must return the scalar loss, (loss, {{name: value}}), "
                        f"{{'loss': loss, name: value}} or an object with .loss; it returned {what}")
    bad = [k for k, v in metrics.items() if not isinstance(k, str) or not _scalar(v)]
    if bad:
        raise TaskError(f"a plug-in's metrics must map names to numbers or 0-dim tensors; not {bad[:3]}")
    return loss, {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in metrics.items()}


class PluginTask:
    """The task of `task: custom`: fetch the examples the loop's indices name, collate, call forward(batch).

    Args:
        train, val: the datasets (`load_datasets`); val may be None.
    """

    def __init__(self, train: Any, val: Any):
        self.datasets = {TRAIN: train, VAL: val}

    def batch(self, idx: torch.Tensor, split: torch.Tensor) -> Any:
        """The collated micro batch of examples `idx` of dataset `split` (`TRAIN` or `VAL`), on idx's device."""
        from torch.utils.data import default_collate

        ds = self.datasets[int(split[0])]
        examples = [ds[int(i)] for i in idx.tolist()]
        return to_device(default_collate(examples), idx.device)

    def loss_and_metrics(self, model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """(scalar loss with grad, float metrics) of `model(collated batch)` (see `loss_and_metrics_of`)."""
        idx, split = batch
        return loss_and_metrics_of(model(self.batch(idx, split)))


def build_model(spec: Any) -> torch.nn.Module:
    """`model.target`'s module for `task: custom` (gets `model.kwargs`, and `seed` if it names it).

    Raises:
        TaskError: the factory did not return a torch.nn.Module.
    """
    fn = _load(spec.model.target)
    kwargs = dict(spec.model.kwargs)
    if "seed" in inspect.signature(fn).parameters and "seed" not in kwargs:
        kwargs["seed"] = spec.seed
    model = fn(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise TaskError(f"model.target {spec.model.target!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_for_spec(spec: Any) -> Any:
    """`raybig.train.built.Built` for `task: custom`: the plug-in model, scored by `PluginTask`."""
    from raybig.train.built import Built

    train, val = load_datasets(spec)
    return Built(build_model(spec), "plugin", task=PluginTask(train, val))


def batches_for_spec(spec: Any, rank: int, world_size: int) -> DatasetBatches:
    """This rank's `DatasetBatches` for a `task: custom` spec."""
    train, val = load_datasets(spec)
    t = spec.train
    return DatasetBatches(len(train), len(val) if val is not None else 0, t.micro_batch_size, t.grad_accum,
                          spec.seed, rank, world_size, t.eval_batches)


def data_state(spec: Any, batches: DatasetBatches) -> dict[str, Any]:
    """What a checkpoint records of the stream (a changed dataset size reads as changed data on resume)."""
    return {"prepared": f"custom:{spec.data.target}:{batches.n_train}:{batches.n_val}",
            "world_size": batches.world_size}
