"""Consolidated exports: `<run>/export/{model.safetensors,config.json}`.

Loading never unpickles: weights come from safetensors; DeepSpeed checkpoints
are read with `torch.load(weights_only=True)` through DeepSpeed's zero_to_fp32.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from raybig import storage

EXPORT_DIR = "export"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def write_export(run_dir: str, state_dict: dict[str, torch.Tensor], model_cfg: dict[str, Any],
                 tied: tuple[str, ...] = (), precision: str = "fp32", name: str = "") -> str:
    """Write weights + config under `run_dir/export`, publishing config.json last."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items() if k not in tied}
    out = storage.join(run_dir, EXPORT_DIR)
    fs, path = storage.fs_for(out)
    fs.makedirs(path, exist_ok=True)
    blob = save(tensors, metadata={"format": "pt"})
    with fs.open(f"{path}/{WEIGHTS}.tmp", "wb") as f:
        f.write(blob)
    fs.mv(f"{path}/{WEIGHTS}.tmp", f"{path}/{WEIGHTS}")
    meta = {"model": model_cfg, "tokenizer": "bytes", "precision": precision, "name": name,
            "tied": list(tied)}
    storage.write_text(f"{out}/{CONFIG}", json.dumps(meta, indent=2))
    return out


def resolve_export(uri: str) -> str:
    """A run dir or an export dir -> the export dir."""
    uri = storage.normalize(uri)
    if storage.exists(f"{uri}/{CONFIG}"):
        return uri
    if storage.exists(f"{uri}/{EXPORT_DIR}/{CONFIG}"):
        return f"{uri}/{EXPORT_DIR}"
    raise FileNotFoundError(f"{uri!r} holds no raybig export ({EXPORT_DIR}/{CONFIG})")


def read_export(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load

    ex = resolve_export(uri)
    meta = json.loads(storage.read_text(f"{ex}/{CONFIG}"))
    fs, path = storage.fs_for(f"{ex}/{WEIGHTS}")
    with fs.open(path, "rb") as f:
        return load(f.read()), meta


def load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Weights from an export/run dir, or from a DeepSpeed ZeRO checkpoint dir."""
    try:
        return read_export(uri)[0]
    except FileNotFoundError:
        pass
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download_dir(uri, tmp)
        if not os.path.exists(os.path.join(local, "latest")):
            raise FileNotFoundError(f"{uri!r} is neither a raybig export nor a DeepSpeed checkpoint")
        return get_fp32_state_dict_from_zero_checkpoint(local)


def load_model(uri: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The exported model, ready for inference, without DeepSpeed."""
    from raybig.train.build import load_target
    from raybig.train.model import GPT, GPTConfig

    sd, meta = read_export(uri)
    cfg = meta["model"]
    if "target" in cfg:
        fn = load_target(cfg["target"])
        model = fn(**cfg.get("kwargs", {}))
    else:
        model = GPT(GPTConfig(**{**cfg, "activation_checkpointing": False, "dropout": 0.0}))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in set(meta.get("tied", []))]
    if missing or unexpected:
        raise ValueError(f"export does not match its model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval(), meta
