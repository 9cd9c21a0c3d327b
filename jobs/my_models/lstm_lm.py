"""A plug-in model: any torch.nn.Module trains through raybig's DeepSpeed path.

Contract: `forward(idx, targets)` returns the mean next-token loss. The factory may take
`vocab_size` and `seq_len`; raybig passes them when it does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        h, _ = self.lstm(self.embed(idx))  # (B, T, hidden)
        logits = self.head(h)  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def build(vocab_size: int = 256, hidden: int = 128, layers: int = 1) -> nn.Module:
    return LSTMLanguageModel(vocab_size, hidden, layers)
