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

import numpy as np
import torch
import torch.nn as nn

from raybig.errors import EXIT_SPEC, RaybigError


class ClassifierDataError(RaybigError):
    """Arrays that do not fit the classifier (shapes, labels out of range, non-finite); exit 2."""

    exit_code = EXIT_SPEC


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
