"""Build the network a spec names: the GPT, or a user's plug-in factory."""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING

import torch.nn as nn

from raybig.data.text import VOCAB_SIZE
from raybig.model import GPT, GPTConfig

if TYPE_CHECKING:
    from raybig.spec.models import TrainSpec


def gpt_config(spec: TrainSpec) -> GPTConfig:
    m = spec.model
    return GPTConfig(**m.gpt_shape(), vocab_size=m.vocab_size or VOCAB_SIZE, dropout=m.dropout,
                     bias=m.bias, activation_checkpointing=spec.train.activation_checkpointing)


def load_target(target: str):
    """'package.module:factory' -> the callable."""
    mod_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportError(f"model.target {target!r}: cannot import {mod_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ImportError(f"model.target {target!r}: {mod_name} has no callable {attr!r}")
    return fn


def build_model(spec: TrainSpec) -> nn.Module:
    """The model for `spec`. Plug-ins get `vocab_size` and `seq_len` if their factory takes them.

    Contract for a plug-in: `forward(idx, targets)` returns the mean loss (a scalar tensor).
    """
    if spec.model.target is None:
        return GPT(gpt_config(spec))
    fn = load_target(spec.model.target)
    kwargs = dict(spec.model.kwargs)
    params = inspect.signature(fn).parameters
    for k, v in (("vocab_size", spec.model.vocab_size or VOCAB_SIZE), ("seq_len", spec.data.seq_len)):
        if k in params and k not in kwargs:
            kwargs[k] = v
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.target {spec.model.target!r} returned {type(model).__name__}, "
                        "not a torch.nn.Module")
    return model
