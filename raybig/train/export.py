"""Consolidated exports: `<run>/export/{model.safetensors,config.json}`.

Loading never runs pickled code: weights come from safetensors; DeepSpeed checkpoints
(`init_from`, resume) are read inside `weights_only_loads()`, which forces
`torch.load(weights_only=True)` on DeepSpeed (it passes `weights_only=False` itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from raybig import storage
from raybig.tokenizer import BYTES

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
    meta = {"model": model_cfg, "tokenizer": BYTES.name, "precision": precision, "name": name,
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
    """(weights, config.json) of the export at `uri` (a run or export dir); FileNotFoundError if none."""
    from safetensors.torch import load

    ex = resolve_export(uri)
    meta = json.loads(storage.read_text(f"{ex}/{CONFIG}"))
    fs, path = storage.fs_for(f"{ex}/{WEIGHTS}")
    with fs.open(path, "rb") as f:
        return load(f.read()), meta


def deepspeed_safe_globals() -> list[Any]:
    """The plain-data classes DeepSpeed pickles into its checkpoints.

    Found by scanning ZeRO 0-3, offload and resumed checkpoints with
    torch.serialization.get_unsafe_globals_in_checkpoint. Unpickling them only sets attributes; no
    code of the checkpoint's choosing runs.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: every `torch.load` runs with weights_only=True, whatever its caller asked for.

    DeepSpeed's checkpoint readers pass weights_only=False, which would execute any pickled code in a
    checkpoint file; raybig loads checkpoints it did not write (init_from, --resume-from), so it
    overrides them. A file that needs another global fails with torch's UnpicklingError.
    """
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


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
        with weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(local)


def load_model(uri: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The exported model, ready for inference, without DeepSpeed."""
    from raybig.model import GPT, GPTConfig
    from raybig.train.build import load_target

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
