"""A plug-in model and dataset for `task: custom`: fit y = sin(3x) from noisy samples.

The dataset is a map-style torch Dataset of examples `{"x": (1,) float32, "y": (1,) float32}`;
raybig collates `train.micro_batch_size` of them into `{"x": (B, 1), "y": (B, 1)}` and calls the
model's `forward(batch)`, which returns the loss and a named metric (`mae`), reported as `mae`
beside `loss` and as `val_mae` beside `val_loss`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset


class SineDataset(Dataset):
    """`examples` points x ~ U(-1, 1), y = sin(3x) + N(0, noise^2); a seeded, fixed set per split."""

    def __init__(self, examples: int, noise: float, seed: int):
        rng = np.random.default_rng(seed)
        self.x = rng.uniform(-1.0, 1.0, size=(examples, 1)).astype(np.float32)
        self.y = (np.sin(3.0 * self.x) + rng.normal(0.0, noise, size=self.x.shape)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.from_numpy(self.x[i]), "y": torch.from_numpy(self.y[i])}


def build_dataset(split: str, seed: int, examples: int = 2048, noise: float = 0.05) -> SineDataset:
    """The training set, or (split="val") a quarter as many held-out points from another seed."""
    if split == "val":
        return SineDataset(max(1, examples // 4), noise, seed + 1_000_003)
    return SineDataset(examples, noise, seed)


class SineRegressor(nn.Module):
    """x (B, 1) -> MLP -> y_hat (B, 1); forward(batch) returns (MSE loss, {"mae": mean |error|})."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        err = self.net(batch["x"]) - batch["y"]  # (B, 1)
        return (err ** 2).mean(), {"mae": err.abs().mean().detach()}


def build_model(hidden: int = 64) -> SineRegressor:
    """The regressor (`model.kwargs`: hidden)."""
    return SineRegressor(hidden)
