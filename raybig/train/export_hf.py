"""Exports as `save_pretrained` folders that plain transformers (and every tool built on it) loads.

- `export_raybig_gpt`: raybig's own GPT (`raybig.model.GPT`) maps one to one onto transformers'
  `GPT2LMHeadModel`: same pre-norm block, tanh-approximated GELU (`gelu_pytorch_tanh`, which is
  `F.gelu(approximate="tanh")` exactly), LayerNorm eps 1e-5, learned positions, tied head. Linear
  weights are transposed into GPT-2's Conv1D layout (in, out), and where raybig has `bias=False` the
  biases GPT-2 always has are written as zeros.
- `save_hf_export`: a Hugging Face model (trained from `model.hf`) back in the class it came from.

Both write config.json (with `architectures`), safetensors weights (sharded with an index above
`max_shard_size`), `generation_config.json` and the tokenizer files into a temporary sibling
folder and rename it into place at the end (for a remote destination: upload everything, then
config.json last), so a crash never leaves something that looks like an export.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch

CONFIG = "config.json"
DEFAULT_MAX_SHARD = 2 * 1024**3
"""Shard safetensors above 2 GiB per file (transformers' own default is 5 GB; smaller eases uploads)."""

_GPT2_TOKEN = "<|endoftext|>"


# --------------------------------------------------------------------------- atomic folders


@contextlib.contextmanager
def atomic_export_dir(out_dir: str) -> Iterator[str]:
    """Yield a fresh local folder to fill; on success it becomes `out_dir`, on error it is deleted.

    Local `out_dir`: the folder is a temporary sibling renamed into place (an existing export is
    replaced only once the new one is complete). fsspec URI: the files are written locally, then
    uploaded with config.json last, since object stores have no folder rename and readers recognise
    an export by its config.json.
    """
    remote = "://" in out_dir and not out_dir.startswith("file://")
    if out_dir.startswith("file://"):
        out_dir = out_dir[len("file://"):]
    if remote:
        tmp = tempfile.mkdtemp(prefix="raybig-export-")
    else:
        out_dir = os.path.abspath(os.path.expanduser(out_dir))
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        if remote:
            _upload_config_last(tmp, out_dir)
        else:
            old = None
            if os.path.exists(out_dir):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
                os.rename(out_dir, os.path.join(old, "x"))
            os.rename(tmp, out_dir)
            if old:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _upload_config_last(local: str, uri: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)
    names = sorted(os.listdir(local), key=lambda n: n == CONFIG)
    for name in names:
        fs.put_file(os.path.join(local, name), f"{path.rstrip('/')}/{name}")


# --------------------------------------------------------------------------- safetensors, sharded


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {size!r}; e.g. 500MB, 2GiB or a number of bytes")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(unit[0] if unit[0] in "KMGT" else " "))


def save_safetensors(state_dict: Mapping[str, torch.Tensor], out_dir: str,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD) -> list[str]:
    """Write tensors as `model.safetensors`, or as shards + `model.safetensors.index.json` above a size.

    Names and layout follow transformers (`model-00001-of-0000N.safetensors`, index with
    `metadata.total_size` in bytes and `weight_map`). Tensors are written contiguous, on CPU, in
    their own dtype. Returns the file names written.
    """
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for k, v in state_dict.items():
        t = v.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + n > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][k] = t
        sizes[-1] += n
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
    return [*names, "model.safetensors.index.json"]


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-in for each byte (openai/gpt-2 src/encoder.py), which the tokenizers
    # library's ByteLevel pre-tokenizer also uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def byte_level_hf_tokenizer(model_max_length: int | None = None) -> Any:
    """A transformers tokenizer whose ids are exactly raybig's byte tokenizer's (UTF-8 byte values).

    A `tokenizers` BPE with the 256 byte symbols as its vocabulary, id = byte value, and no merges,
    behind the ByteLevel pre-tokenizer (no prefix space, no regex split) and decoder: encoding
    yields the UTF-8 bytes, decoding is UTF-8 with U+FFFD for invalid sequences, as raybig's is.
    No special tokens (vocabulary exactly 256). Differs only on lone surrogates, which raybig
    encodes as `?` and a Rust string cannot hold.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    kw = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def hf_tokenizer_for(tokenizer: Any, model_max_length: int | None = None) -> Any:
    """A transformers tokenizer for a raybig tokenizer.

    Args:
        tokenizer: `raybig.tokenizer.ByteTokenizer` (or the name "bytes"), `BpeTokenizer`, an
            `HFTokenizer` from `raybig.train.hf`, or a transformers tokenizer (returned as is).
        model_max_length: the model's context length, recorded in tokenizer_config.json.

    Raises:
        TypeError: any other object.
    """
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if hasattr(tokenizer, "hf") and isinstance(tokenizer.hf, PreTrainedTokenizerBase):
        return tokenizer.hf
    name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name", None)
    if name == "bytes":
        return byte_level_hf_tokenizer(model_max_length)
    if name == "bpe" and hasattr(tokenizer, "tok"):
        from tokenizers import Tokenizer

        kw = {"model_max_length": model_max_length} if model_max_length else {}
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.to_json()),
                                       bos_token=_GPT2_TOKEN, eos_token=_GPT2_TOKEN, **kw)
    raise TypeError(f"cannot export tokenizer {tokenizer!r} (want bytes, bpe or a Hugging Face tokenizer)")


def _save_tokenizer(hf_tok: Any, out_dir: str) -> None:
    hf_tok.save_pretrained(out_dir)
    # transformers 5 records its internal class name ("TokenizersBackend"), which 4.x readers (and
    # tools pinned to them) do not know; PreTrainedTokenizerFast loads in both.
    p = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.exists(p):
        with open(p) as f:
            cfg = json.load(f)
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            with open(p, "w") as f:
                json.dump(cfg, f, indent=2)


# --------------------------------------------------------------------------- raybig GPT -> GPT-2


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    return dict(cfg)


def gpt2_config_for(model_cfg: Any, tokenizer: Any = None) -> dict[str, Any]:
    """The `GPT2Config` fields (as a config.json dict) equivalent to a raybig `GPTConfig`.

    Args:
        model_cfg: `raybig.model.GPTConfig` or its dict (n_layer, n_head, n_embd, block_size,
            vocab_size, dropout, bias).
        tokenizer: the transformers tokenizer of the export; its BOS/EOS ids go into the config.

    The activation is `gelu_pytorch_tanh` and `layer_norm_epsilon` 1e-5 because raybig's MLP calls
    `F.gelu(approximate="tanh")` and its LayerNorm uses eps 1e-5 (`raybig/model.py`).
    """
    c = _cfg_dict(model_cfg)
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": int(c["vocab_size"]), "n_positions": int(c["block_size"]),
        "n_embd": int(c["n_embd"]), "n_layer": int(c["n_layer"]), "n_head": int(c["n_head"]),
        "n_inner": None, "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": float(c.get("dropout", 0.0)), "embd_pdrop": float(c.get("dropout", 0.0)),
        "attn_pdrop": float(c.get("dropout", 0.0)), "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": bos, "eos_token_id": eos, "use_cache": True,
    }


_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_PREFIXES = ("module.", "_orig_mod.")  # DeepSpeed engine, torch.compile


def gpt2_state_dict(state_dict: Mapping[str, torch.Tensor], model_cfg: Any) -> dict[str, torch.Tensor]:
    """Map raybig GPT weights to `GPT2LMHeadModel` weights (without the tied `lm_head.weight`).

    Shapes: raybig's nn.Linear weights are (out, in); GPT-2's Conv1D weights are (in, out), so
    c_attn (3C, C) -> (C, 3C), attn c_proj (C, C), mlp c_fc (4C, C) -> (C, 4C), mlp c_proj
    (C, 4C) -> (4C, C) are transposed. Every bias GPT-2 has and raybig lacks (`bias=False`) is
    written as zeros of the right shape, so the function computes the same thing.

    Raises:
        ValueError: the weights are not raybig's GPT (missing or unexpected keys).
    """
    c = _cfg_dict(model_cfg)
    sd: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        sd[k] = v
    C, L = int(c["n_embd"]), int(c["n_layer"])
    bias_shapes = {"ln_1.bias": (C,), "ln_2.bias": (C,), "attn.c_attn.bias": (3 * C,),
                   "attn.c_proj.bias": (C,), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.bias": (C,)}
    missing = [k for k in ("wte.weight", "wpe.weight", "ln_f.weight") if k not in sd]
    if missing:
        raise ValueError(f"not raybig GPT weights: missing {missing}")
    wte = sd["wte.weight"]
    dtype = wte.dtype
    out: dict[str, torch.Tensor] = {"transformer.wte.weight": wte, "transformer.wpe.weight": sd["wpe.weight"]}
    used = {"wte.weight", "wpe.weight", "lm_head.weight"}
    for i in range(L):
        for name in ("ln_1.weight", "ln_2.weight", *_TRANSPOSED, *bias_shapes):
            key = f"h.{i}.{name}"
            if key in sd:
                t = sd[key]
                t = t.t() if name in _TRANSPOSED else t
                used.add(key)
            elif name in bias_shapes:
                t = torch.zeros(bias_shapes[name], dtype=dtype)
            else:
                raise ValueError(f"not raybig GPT weights: missing {key}")
            out[f"transformer.h.{i}.{name}"] = t.contiguous()
    out["transformer.ln_f.weight"] = sd["ln_f.weight"]
    out["transformer.ln_f.bias"] = sd.get("ln_f.bias", torch.zeros(C, dtype=dtype))
    used |= {"ln_f.weight", "ln_f.bias"}
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"not raybig GPT weights: unexpected {extra[:5]}")
    return out


def export_raybig_gpt(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], model_cfg: Any,
                      tokenizer: Any, out_dir: str, dtype: torch.dtype | None = None,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD, extra: Mapping[str, Any] | None = None) -> str:
    """Write raybig's GPT as a `GPT2LMHeadModel` save_pretrained folder at `out_dir`; return `out_dir`.

    Args:
        model_or_state_dict: a `raybig.model.GPT` or its (consolidated, fp32 or not) state dict.
        model_cfg: its `GPTConfig` (or dict).
        tokenizer: the run's tokenizer (see `hf_tokenizer_for`); with "bytes" the export's
            tokenizer yields the same ids as raybig's.
        out_dir: local folder or fsspec URI; replaced atomically (see `atomic_export_dir`).
        dtype: cast floating weights to this dtype (default: keep), recorded as config `dtype`.
        max_shard_size: shard above this many bytes (int, or "500MB"/"2GiB").
        extra: more keys for config.json (e.g. `{"raybig": {...}}` provenance); transformers keeps
            unknown keys as config attributes.

    Raises:
        ValueError: the weights are not raybig's GPT. TypeError: an unknown tokenizer.
    """
    from transformers import GenerationConfig

    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    tensors = gpt2_state_dict(sd, model_cfg)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    c = _cfg_dict(model_cfg)
    hf_tok = hf_tokenizer_for(tokenizer, model_max_length=int(c["block_size"]))
    if len(hf_tok) > int(c["vocab_size"]):
        raise ValueError(f"tokenizer has {len(hf_tok)} tokens but the model {c['vocab_size']} rows")
    config = gpt2_config_for(c, hf_tok)
    config["dtype"] = str(tensors["transformer.wte.weight"].dtype).removeprefix("torch.")
    config.update(extra or {})
    with atomic_export_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp, max_shard_size)
        GenerationConfig(bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"],
                         pad_token_id=config["eos_token_id"]).save_pretrained(tmp)
        _save_tokenizer(hf_tok, tmp)
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
    return out_dir


def save_hf_export(model: Any, tokenizer: Any, out_dir: str,
                   max_shard_size: int | str = DEFAULT_MAX_SHARD, state_dict: Mapping[str, torch.Tensor] | None = None) -> str:
    """Write a Hugging Face model (the class it came from) + tokenizer to `out_dir`; return it.

    Args:
        model: a `transformers.PreTrainedModel`. A peft model is merged first
            (`merge_and_unload`), so the export is the plain model with the adapter folded in.
        tokenizer: `HFTokenizer` or a transformers tokenizer (or any `hf_tokenizer_for` input).
        out_dir: local folder or fsspec URI; replaced atomically (see `atomic_export_dir`).
        max_shard_size: shard above this many bytes.
        state_dict: consolidated weights to save instead of the model's own (e.g. gathered from
            ZeRO-3 partitions on rank 0 with DeepSpeed's routine).

    Writes `save_pretrained` (safetensors), the tokenizer and `generation_config.json`.
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    hf_tok = hf_tokenizer_for(tokenizer)
    with atomic_export_dir(out_dir) as tmp:
        kw: dict[str, Any] = {"max_shard_size": max_shard_size}
        if state_dict is not None:
            kw["state_dict"] = dict(state_dict)
        model.save_pretrained(tmp, **kw)  # also writes generation_config.json when the model has one
        if not os.path.exists(os.path.join(tmp, "generation_config.json")):
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
        _save_tokenizer(hf_tok, tmp)
    return out_dir
