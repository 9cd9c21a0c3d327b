"""Built-in classifiers for arrays (an MLP and a small CNN) and the scikit-learn `digits` set.

`digits` (1,797 8x8 grey images of handwritten digits, 10 classes; scikit-learn ships it, so it
needs no download) is raybig's offline stand-in for MNIST. `load_digits_split` gives a stratified,
seeded train/validation split as float32 arrays in [0, 1].

Both models take float32 inputs of shape (B, *input_shape) (any shape whose product is the feature
count for the MLP; (B, H, W) or (B, C, H, W) for the CNN) and return (B, num_classes) float logits,
so `raybig.train.tasks.Classification` scores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from raybig.errors import ClassifierDataError


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear.

    Args:
        in_features: product of the input's non-batch dimensions (64 for digits).
        num_classes: outputs (logits) per example.
        hidden: widths of the hidden layers.
        dropout: after each hidden layer (training only).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (128, 64),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.in_features, self.num_classes = in_features, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) float32 with prod(...) = in_features -> (B, num_classes) logits."""
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv layers (same padding) -> 2x2 max-pool -> MLP head; sized for small images.

    Args:
        image_shape: (H, W) or (C, H, W) of one example (digits: (8, 8)).
        num_classes: outputs (logits) per example.
        channels: output channels of the two conv layers.
        hidden: width of the head's hidden layer.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, channels: tuple[int, int] = (16, 32),
                 hidden: int = 64):
        super().__init__()
        shape = tuple(image_shape)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3:
            raise ClassifierDataError(f"cnn needs (H, W) or (C, H, W) images, got shape {tuple(image_shape)}")
        self.image_shape = shape
        c, h, w = shape
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * (h // 2) * (w // 2), hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C*H*W), (B, H, W) or (B, C, H, W) float32 -> (B, num_classes) logits."""
        x = x.reshape(x.size(0), *self.image_shape)  # (B, C, H, W)
        return self.head(self.features(x))


CLASSIFIERS = ("mlp", "cnn")
"""Names `build_classifier` accepts (the spec's proposed `model.classifier`)."""


def build_classifier(name: str, input_shape: Sequence[int], num_classes: int, **options: object) -> nn.Module:
    """A built-in classifier by name: `mlp` or `cnn`, for examples of shape `input_shape` (no batch dim).

    Raises:
        ClassifierDataError: unknown name, or an input shape the model cannot take.
    """
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes, **options)  # type: ignore[arg-type]
    if name == "cnn":
        return SmallCNN(input_shape, num_classes, **options)  # type: ignore[arg-type]
    raise ClassifierDataError(f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS)}")


def check_arrays(x: np.ndarray, y: np.ndarray, num_classes: int, input_shape: Sequence[int] | None = None) -> None:
    """Raise `ClassifierDataError` (one line) unless x (N, ...) and y (N,) fit a `num_classes` model.

    Checks: same N; y integral and in [0, num_classes); x finite; x's example shape equals
    `input_shape` (or at least has its element count) when given.
    """
    if x.shape[0] != y.shape[0]:
        raise ClassifierDataError(f"{x.shape[0]} examples but {y.shape[0]} labels")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ClassifierDataError(f"labels must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ClassifierDataError(f"labels must be in [0, {num_classes}), found values in [{y.min()}, {y.max()}]")
    if input_shape is not None and math.prod(x.shape[1:]) != math.prod(input_shape):
        raise ClassifierDataError(f"examples have shape {tuple(x.shape[1:])}, the model expects "
                                  f"{tuple(input_shape)}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ClassifierDataError("features contain NaN or inf")


@dataclass(frozen=True)
class ArraySplit:
    """A train/validation split of labelled arrays.

    Attributes:
        x_train, x_val: float32 (N, *example_shape), digits scaled to [0, 1].
        y_train, y_val: int64 (N,) labels in [0, num_classes).
        example_shape: shape of one example (digits: (8, 8)).
        num_classes: number of classes.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    example_shape: tuple[int, ...]
    num_classes: int

    def save_npz(self, path: str) -> None:
        """Write x_train, y_train, x_val, y_val to one .npz (the array data format's layout)."""
        np.savez(path, x_train=self.x_train, y_train=self.y_train, x_val=self.x_val, y_val=self.y_val)


def load_digits_split(val_fraction: float = 0.2, seed: int = 0) -> ArraySplit:
    """scikit-learn's digits (shipped with it, no download) as a stratified, seeded split.

    Pixels (0..16 integers) are divided by 16 into float32 [0, 1]; images keep their (8, 8) shape.
    The same `seed` always gives the same split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # (1797, 8, 8)
    y = d.target.astype(np.int64)
    xt, xv, yt, yv = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    return ArraySplit(xt, yt, xv, yv, example_shape=(8, 8), num_classes=10)


def _read_parquet(dataset: str, label_field: str) -> dict[str, np.ndarray]:
    """A .parquet of labelled examples as the .npz layout: x (N, ...) float32, y (N,), split if present.

    Columns: `x` (a list, or nested lists, of numbers per row), `label_field` (integers), optionally
    `split` ("train" / "val"; rows of other values are dropped).
    """
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(dataset)
    except (OSError, ValueError) as e:
        raise ClassifierDataError(f"classifier.dataset {dataset!r}: cannot read it as parquet: {e}") from None
    if "x" not in t.column_names or label_field not in t.column_names:
        raise ClassifierDataError(f"classifier.dataset {dataset!r} needs columns x and {label_field!r}; it has "
                                  f"{t.column_names}")
    try:
        x = np.asarray(t.column("x").to_pylist(), dtype=np.float32)
    except ValueError as e:  # ragged rows
        raise ClassifierDataError(f"classifier.dataset {dataset!r}: rows of x differ in shape ({e})") from None
    y = t.column(label_field).to_numpy()
    if "split" not in t.column_names:
        return {"x": x, "y": y}
    split = np.asarray(t.column("split").to_pylist())
    tr, va = split == "train", split == "val"
    return {"x_train": x[tr], "y_train": y[tr], "x_val": x[va], "y_val": y[va]}


def load_arrays(dataset: str = "digits", val_fraction: float = 0.2, seed: int = 0,
                num_classes: int | None = None, input_shape: Sequence[int] | None = None,
                label_field: str = "label") -> ArraySplit:
    """The labelled arrays a classifier spec names, checked (`check_arrays`), as a train/val split.

    Args:
        dataset: `digits` (scikit-learn's, offline), an .npz (any fsspec URI) holding x_train,
            y_train, x_val, y_val, or x, y (then split here, seeded), or a .parquet (`_read_parquet`).
        val_fraction: held out when the file has no validation arrays.
        seed: the split's seed.
        num_classes: classes of the model (default: max label + 1).
        input_shape: one example's shape; examples are reshaped to it (their element count must match).
        label_field: the parquet label column.

    Raises:
        ClassifierDataError: a missing file or array, or arrays that do not fit (one line).
    """
    if dataset == "digits":
        split = load_digits_split(val_fraction, seed)
    else:
        import io

        import fsspec

        if dataset.endswith(".parquet"):
            arrays = _read_parquet(dataset, label_field)
        else:
            try:
                with fsspec.open(dataset, "rb") as f:
                    blob = f.read()
                arrays = dict(np.load(io.BytesIO(blob), allow_pickle=False))
            except (OSError, ValueError) as e:
                raise ClassifierDataError(f"classifier.dataset {dataset!r}: cannot read it as .npz: {e}") from None
        if {"x_train", "y_train", "x_val", "y_val"} <= set(arrays):
            xt, yt, xv, yv = (arrays[k] for k in ("x_train", "y_train", "x_val", "y_val"))
        elif {"x", "y"} <= set(arrays):
            from sklearn.model_selection import train_test_split

            x, y = arrays["x"], arrays["y"]
            check_arrays(x, y, int(num_classes or (y.max() + 1 if y.size else 1)))
            xt, xv, yt, yv = train_test_split(x, y, test_size=val_fraction, random_state=seed)
        else:
            raise ClassifierDataError(f"classifier.dataset {dataset!r} must hold x_train, y_train, x_val, y_val "
                                      f"(or x, y); it holds {sorted(arrays)}")
        k = int(num_classes or max(int(yt.max()), int(yv.max())) + 1)
        split = ArraySplit(xt.astype(np.float32), yt.astype(np.int64), xv.astype(np.float32),
                           yv.astype(np.int64), tuple(xt.shape[1:]), k)
    if input_shape is not None and tuple(input_shape) != split.example_shape:
        for part, x in (("train", split.x_train), ("val", split.x_val)):
            if math.prod(x.shape[1:]) != math.prod(input_shape):
                raise ClassifierDataError(f"classifier.dataset {dataset!r} ({part}): examples have shape "
                                          f"{tuple(x.shape[1:])}, classifier.input_shape is {tuple(input_shape)}")
        shape = tuple(int(d) for d in input_shape)
        split = ArraySplit(split.x_train.reshape(-1, *shape), split.y_train, split.x_val.reshape(-1, *shape),
                           split.y_val, shape, split.num_classes)
    k = num_classes or split.num_classes
    for x, y, part in ((split.x_train, split.y_train, "train"), (split.x_val, split.y_val, "val")):
        try:
            check_arrays(x, y, k, split.example_shape)
        except ClassifierDataError as e:
            raise ClassifierDataError(f"classifier.dataset {dataset!r} ({part}): {e}") from None
    if k != split.num_classes:
        split = ArraySplit(split.x_train, split.y_train, split.x_val, split.y_val, split.example_shape, k)
    return split


@dataclass
class ArrayBatches:
    """Deterministic classifier batches for one rank, with the interface of `raybig.data.text.Batches`.

    Training: each rank samples `micro_batch_size` examples from its own contiguous shard of the
    training arrays with an RNG keyed on (seed, rank, step, micro), so a resumed run sees the same
    batches. Validation: the validation arrays are split into `world_size` rank shards and each into
    `eval_batches` near-equal chunks, so `val_batch(0..eval_batches-1)` on every rank covers every
    validation example exactly once.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    micro_batch_size: int
    seed: int
    rank: int
    world_size: int
    eval_batches: int

    @classmethod
    def build(cls, split: ArraySplit, micro_batch_size: int, seed: int, rank: int, world_size: int,
              eval_batches: int) -> ArrayBatches:
        """This rank's batches of `split`.

        Raises:
            ClassifierDataError: fewer training examples than ranks, or fewer validation examples
                than ranks x eval_batches.
        """
        n = len(split.y_train) // world_size
        if n < 1:
            raise ClassifierDataError(f"{len(split.y_train)} training examples for {world_size} workers")
        if len(split.y_val) < world_size * eval_batches:
            raise ClassifierDataError(f"{len(split.y_val)} validation examples cannot fill {eval_batches} "
                                      f"eval batches on each of {world_size} workers (lower train.eval_batches)")
        val = np.array_split(np.arange(len(split.y_val)), world_size)[rank]
        return cls(split.x_train[rank * n:(rank + 1) * n], split.y_train[rank * n:(rank + 1) * n],
                   split.x_val[val], split.y_val[val], micro_batch_size, seed, rank, world_size, eval_batches)

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (B, *example_shape) float32, y (B,) int64) of micro step `micro` of `step`."""
        rng = np.random.default_rng([self.seed, self.rank, step, micro])
        idx = rng.integers(0, len(self.y_train), size=self.micro_batch_size)
        return torch.from_numpy(self.x_train[idx]), torch.from_numpy(self.y_train[idx])

    packed = False
    """Never packed (the loop asks)."""

    def get(self, step: int, micro: int) -> _ArrayBatch:
        """`train_batch` as numpy arrays, in the shape the training loop feeds (`x`, `y`)."""
        rng = np.random.default_rng([self.seed, self.rank, step, micro])
        idx = rng.integers(0, len(self.y_train), size=self.micro_batch_size)
        return _ArrayBatch(self.x_train[idx], self.y_train[idx])

    def val_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk `i` (of `eval_batches`) of this rank's validation examples."""
        idx = np.array_split(np.arange(len(self.y_val)), self.eval_batches)[i % self.eval_batches]
        return torch.from_numpy(self.x_val[idx]), torch.from_numpy(self.y_val[idx])


def classifier_config(arch: str, example_shape: Sequence[int], num_classes: int, hidden: Sequence[int],
                      dropout: float = 0.0) -> dict[str, object]:
    """The export's model config of a built-in classifier: `target` + `kwargs` for `build_from_config`."""
    return {"target": "raybig.train.classifiers:build_from_config",
            "kwargs": {"arch": arch, "input_shape": list(example_shape), "num_classes": int(num_classes),
                       "hidden": [int(h) for h in hidden], "dropout": float(dropout)}}


def build_from_config(arch: str, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 64),
                      dropout: float = 0.0) -> nn.Module:
    """A built-in classifier from its export config (`classifier_config`); what `load_model` calls."""
    if arch == "mlp":
        return MLP(math.prod(input_shape), num_classes, hidden=hidden, dropout=dropout)
    return build_classifier(arch, input_shape, num_classes, hidden=int(hidden[0]))


def split_for_spec(spec: Any) -> ArraySplit:
    """The labelled examples of a `task: classification` spec, seeded by `seed`.

    Built-in classifiers: `classifier.dataset`'s arrays. A Hugging Face sequence classifier: the
    text+label records of `data:` tokenized with the run's tokenizer (`text_split`).
    """
    c = spec.classifier
    if spec.model.is_hf:
        return text_split(spec)
    if c is None:
        return load_arrays(seed=spec.seed)
    return load_arrays(c.dataset, c.val_fraction, spec.seed, c.num_classes, c.input_shape, c.label_field)


def read_labelled_texts(spec: Any) -> tuple[list[str], np.ndarray]:
    """(texts, int64 labels) of the jsonl / parquet records under `data.path`.

    Text from `data.text_field` (default `text`), the label from `classifier.label_field` (default
    `label`): an integer, or a string (then classes are the sorted distinct strings).

    Raises:
        ClassifierDataError: no records, a record without either field, or a non-integer label.
    """
    import json

    import fsspec

    from raybig.data.sources import list_sources

    text_field = spec.data.text_field or "text"
    label_field = spec.classifier.label_field if spec.classifier is not None else "label"
    texts: list[str] = []
    labels: list[Any] = []
    for src in list_sources(spec.data.path):
        if src.uri.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fsspec.open(src.uri, "rb") as f:
                t = pq.read_table(f)
            if text_field not in t.column_names or label_field not in t.column_names:
                raise ClassifierDataError(f"{src.uri}: needs columns {text_field!r} and {label_field!r}")
            texts += [str(v) for v in t.column(text_field).to_pylist()]
            labels += t.column(label_field).to_pylist()
            continue
        with fsspec.open(src.uri, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    texts.append(str(rec[text_field]))
                    labels.append(rec[label_field])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ClassifierDataError(f"{src.uri}:{n}: a record with {text_field!r} and {label_field!r} "
                                              f"fields is needed ({type(e).__name__}: {e})") from None
    if not texts:
        raise ClassifierDataError(f"data.path {spec.data.path!r}: no text+label records")
    if all(isinstance(v, str) for v in labels):
        names = sorted(set(labels))
        return texts, np.array([names.index(v) for v in labels], np.int64)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise ClassifierDataError(f"labels ({label_field!r}) must be integers or strings")
    return texts, np.array(labels, np.int64)


def encode_padded(texts: Sequence[str], tokenizer: Any, seq_len: int, pad_id: int) -> np.ndarray:
    """(N, seq_len) int64 ids: each text encoded, cut to `seq_len`, right-padded with `pad_id`."""
    out = np.full((len(texts), seq_len), pad_id, np.int64)
    for i, t in enumerate(texts):
        ids = tokenizer.encode(t)[:seq_len]
        out[i, :len(ids)] = ids
    return out


def pad_id_of(tokenizer: Any) -> int:
    """The id padding is written with (and masked out by): the tokenizer's pad id, else its EOS, else 0."""
    for name in ("pad_id", "eos_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def text_split(spec: Any, tokenizer: Any = None) -> ArraySplit:
    """A Hugging Face sequence classifier's examples: (N, data.seq_len) int64 ids, int64 labels, seeded split.

    Classes: `classifier.num_classes`, else max label + 1; labels out of range raise
    `ClassifierDataError`. `data.val_fraction` (or 0.2 when it is 0) is held out.
    """
    from sklearn.model_selection import train_test_split

    from raybig.train.built import run_tokenizer

    tok = tokenizer if tokenizer is not None else run_tokenizer(spec, None)
    texts, y = read_labelled_texts(spec)
    k = (spec.classifier.num_classes if spec.classifier is not None else None) or int(y.max()) + 1
    x = encode_padded(texts, tok, spec.data.seq_len, pad_id_of(tok))
    check_arrays(x, y, k)
    frac = spec.data.val_fraction or 0.2
    xt, xv, yt, yv = train_test_split(x, y, test_size=frac, random_state=spec.seed)
    return ArraySplit(xt, yt, xv, yv, (spec.data.seq_len,), k)


def build_for_spec(spec: Any, ds_config: Any = None) -> Any:
    """`raybig.train.built.Built` for a `task: classification` spec: the classifier, its task, its export config.

    With `model.hf` / `model.hf_config`: transformers' `AutoModelForSequenceClassification` with
    `num_labels` classes (kind "hf", exported with save_pretrained); otherwise a built-in classifier.
    """
    from raybig.train.built import Built
    from raybig.train.tasks import Classification

    split = split_for_spec(spec)
    if spec.model.is_hf:
        from raybig.train import hf
        from raybig.train.built import hf_source, run_tokenizer

        stage3 = bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3
        model = hf.build_head_model(hf_source(spec), "classification", from_pretrained=spec.model.hf is not None,
                                    trust_remote_code=spec.model.trust_remote_code,
                                    zero3_config=ds_config if stage3 else None, seed=spec.seed,
                                    num_labels=split.num_classes)
        pad = pad_id_of(run_tokenizer(spec, None))
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = pad
        model.train()
        return Built(model, "hf", keep=getattr(model, "_raybig_ds_config", None),
                     task=Classification(split.num_classes), pad_id=pad)
    c = spec.classifier
    arch, hidden, dropout = (c.arch, list(c.hidden), c.dropout) if c is not None else ("mlp", [128, 64], 0.0)
    cfg = classifier_config(arch, split.example_shape, split.num_classes, hidden, dropout)
    model = build_from_config(**cfg["kwargs"])  # type: ignore[arg-type]
    return Built(model, "classifier", config=cfg, task=Classification(split.num_classes))


class _ArrayBatch:
    """One micro batch of arrays in the shape the loop feeds (`x`, `y` numpy; no packing)."""

    positions = None
    doc_ids = None

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y


def batches_for_spec(spec: Any, rank: int, world_size: int) -> ArrayBatches:
    """This rank's `ArrayBatches` of a `task: classification` spec (eval batches: `train.eval_batches`)."""
    return ArrayBatches.build(split_for_spec(spec), spec.train.micro_batch_size, spec.seed, rank, world_size,
                              spec.train.eval_batches)
