"""Exports: `<run>/export/` is a `save_pretrained` folder every tool loads, and raybig loads it back.

Layout (raybig's own GPT): config.json with `architectures: ["GPT2LMHeadModel"]`, safetensors
(sharded with an index above `DEFAULT_MAX_SHARD`), the tokenizer files, `generation_config.json`
(see `raybig.train.export_hf`). config.json also carries raybig's provenance under the key
`raybig` (`PROVENANCE`): the GPT shape, tokenizer, precision, run name; from it `load_model`
rebuilds raybig's own GPT (the inverse of `gpt2_state_dict`), so serving's greedy text is the
same as the trained model's. A plug-in model (`model.target`) that maps to no transformers class
is written in raybig's own layout (safetensors + config.json with only the `raybig` key).

Older raybig exports (`config.json` = `{"model": ..., "tokenizer": ..., "tied": ...}` beside one
`model.safetensors`) still load; `raybig export OLD --out NEW` rewrites one in the new layout.

An export is written into a temporary folder and renamed into place (remote: config.json uploaded
last), so a crash never leaves something that looks like an export.

Loading never runs pickled code: weights come from safetensors; DeepSpeed checkpoints
(`init_from`, resume, `raybig export`) are read inside `weights_only_loads()`, which forces
`torch.load(weights_only=True)` on DeepSpeed (it passes `weights_only=False` itself).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from raybig import storage
from raybig.errors import EXIT_SPEC, IncompleteCheckpointError, RaybigError
from raybig.tokenizer import BYTES, BpeTokenizer, Tokenizer

EXPORT_DIR = "export"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"
"""A run's trained BPE (`data.tokenizer: bpe`) lives at `<run>/tokenizer.json`."""
PROVENANCE = "raybig"
"""config.json key holding raybig's own description of the model (see `write_export`)."""
FORMAT = 2
"""`config.json["raybig"]["format"]`: 2 = save_pretrained layout. Old exports have no such key."""


class ExportError(RaybigError):
    """An export or checkpoint cannot be read or written (wrong kind of folder, wrong weights); exit 2."""

    exit_code = EXIT_SPEC


# --------------------------------------------------------------------------- writing


def run_tokenizer(run_dir: str | None, tokenizer: Any = None) -> Any:
    """The tokenizer to export with a run.

    `tokenizer` itself (an object), by name ("bytes", "bpe"), or, when None, the run's
    `tokenizer.json` (a trained BPE) if it has one, else bytes.

    Raises:
        ExportError: "bpe" named but the run has no tokenizer.json.
    """
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    bpe = storage.join(run_dir, TOKENIZER_FILE) if run_dir else None
    if tokenizer in (None, "bpe") and bpe is not None and storage.exists(bpe):
        return BpeTokenizer.from_json(storage.read_text(bpe))
    if tokenizer == "bpe":
        raise ExportError(f"the run {run_dir} has no {TOKENIZER_FILE} (its trained BPE tokenizer)" if run_dir else
                          f"a BPE run's checkpoint needs its run directory (for {TOKENIZER_FILE})")
    return tokenizer or BYTES.name


def _tokenizer_name(tok: Any) -> str:
    return tok if isinstance(tok, str) else str(getattr(tok, "name", type(tok).__name__))


def _strip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            k = k.removeprefix(p)
        out[k] = v
    return out


def _is_gpt(sd: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any]) -> bool:
    return "target" not in model_cfg and "wte.weight" in sd and "n_head" in model_cfg


def write_export(run_dir: str, state_dict: dict[str, torch.Tensor], model_cfg: dict[str, Any],
                 tied: tuple[str, ...] = (), precision: str = "fp32", name: str = "", *,
                 tokenizer: Any = None, out_dir: str | None = None,
                 max_shard_size: int | str | None = None) -> str:
    """Write the export of a trained model; return its URI (`out_dir`, default `run_dir/export`).

    Args:
        run_dir: the run directory (local or fsspec URI); its `tokenizer.json`, when present, is
            the tokenizer exported (a trained BPE).
        state_dict: consolidated weights (raybig GPT keys; a `module.` prefix is dropped).
        model_cfg: `GPTConfig.to_dict()`, or for a plug-in model `{"target", "kwargs", ...}`.
        tied: keys tied to another weight (not stored; `GPT.tied_keys`).
        precision: what training ran in (recorded).
        name: the run's name (recorded).
        tokenizer: a raybig or transformers tokenizer, or its name ("bytes", "bpe"); None: the
            run's (see `run_tokenizer`).
        out_dir: write here instead of `run_dir/export`.
        max_shard_size: shard the safetensors above this size (default `DEFAULT_MAX_SHARD`).

    raybig's GPT becomes a `GPT2LMHeadModel` folder (`export_raybig_gpt`) with
    `config.json["raybig"]` = {"format", "model", "tokenizer", "precision", "name", "tied"}; other
    models are written in raybig's own layout with the same provenance.
    """
    from raybig.train.export_hf import (
        DEFAULT_MAX_SHARD,
        atomic_export_dir,
        export_raybig_gpt,
        save_safetensors,
    )

    out = out_dir or storage.join(run_dir, EXPORT_DIR)
    shard = max_shard_size or DEFAULT_MAX_SHARD
    sd = _strip(state_dict)
    tok = run_tokenizer(run_dir, tokenizer)
    prov = {"format": FORMAT, "model": dict(model_cfg), "tokenizer": _tokenizer_name(tok),
            "precision": precision, "name": name, "tied": list(tied)}
    if _is_gpt(sd, model_cfg):
        export_raybig_gpt(sd, model_cfg, tok, out, max_shard_size=shard, extra={PROVENANCE: prov})
        return out
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items() if k not in tied}
    with atomic_export_dir(out) as tmp:
        save_safetensors(tensors, tmp, shard)
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump({PROVENANCE: prov}, f, indent=2)
    return out


# --------------------------------------------------------------------------- finding and reading


def resolve_export(uri: str) -> str:
    """A run dir or an export dir (any fsspec URI) -> the export dir; FileNotFoundError if neither."""
    uri = storage.normalize(uri)
    if storage.exists(f"{uri}/{CONFIG}"):
        return uri
    if storage.exists(f"{uri}/{EXPORT_DIR}/{CONFIG}"):
        return f"{uri}/{EXPORT_DIR}"
    raise FileNotFoundError(f"{uri!r} holds no raybig export ({EXPORT_DIR}/{CONFIG})")


def read_config(uri: str) -> dict[str, Any]:
    """config.json of the export at `uri` (a run or export dir)."""
    cfg = json.loads(storage.read_text(f"{resolve_export(uri)}/{CONFIG}"))
    if not isinstance(cfg, dict):
        raise ExportError(f"{uri}: {CONFIG} is not a JSON object")
    return cfg


def export_format(cfg: Mapping[str, Any]) -> str:
    """The layout of an export, from its config.json.

    "hf" (save_pretrained, with or without raybig's provenance), "raybig" (raybig's own layout,
    provenance only), or "old" (the layout before save_pretrained exports).
    """
    if "architectures" in cfg or "model_type" in cfg:
        return "hf"
    if PROVENANCE in cfg:
        return "raybig"
    if "model" in cfg:
        return "old"
    raise ExportError("config.json is neither a raybig nor a Hugging Face export "
                      "(no `raybig`, `architectures` or `model_type` key)")


def _read_weights(ex: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    fs, path = storage.fs_for(ex)
    path = path.rstrip("/")
    if fs.exists(f"{path}/{WEIGHTS}"):
        files = [WEIGHTS]
    elif fs.exists(f"{path}/{INDEX}"):
        index = json.loads(fs.cat_file(f"{path}/{INDEX}"))
        files = sorted(set(index["weight_map"].values()))
    else:
        raise ExportError(f"{ex}: no {WEIGHTS} or {INDEX}")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        sd.update(load(fs.cat_file(f"{path}/{name}")))
    return sd


def read_export(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(raybig-keyed weights, provenance) of the export at `uri`; FileNotFoundError if none.

    For a `GPT2LMHeadModel` export the weights are mapped back to raybig's GPT (`raybig_state_dict`);
    the provenance has the keys an old export's config.json had ("model", "tokenizer", "tied", ...).
    """
    ex = resolve_export(uri)
    cfg = read_config(ex)
    fmt = export_format(cfg)
    sd = _read_weights(ex)
    if fmt == "old":
        return sd, {**cfg, "format": 1}
    if fmt == "raybig":
        return sd, dict(cfg[PROVENANCE])
    prov = dict(cfg.get(PROVENANCE) or {})
    if cfg.get("model_type") != "gpt2" and "GPT2LMHeadModel" not in cfg.get("architectures", []):
        raise ExportError(f"{ex} is a {cfg.get('model_type') or cfg.get('architectures')} model, not raybig's "
                          "GPT; load it with transformers (AutoModelForCausalLM)")
    model_cfg = prov.get("model") or gpt_config_from_gpt2(cfg)
    prov.setdefault("model", model_cfg)
    prov.setdefault("tokenizer", "bytes" if int(cfg.get("vocab_size", 0)) == 256 else "hf")
    prov.setdefault("tied", ["lm_head.weight"])
    return raybig_state_dict(sd, model_cfg), prov


def gpt_config_from_gpt2(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A raybig `GPTConfig` dict for a GPT-2 config.json raybig did not write (biases on).

    Raises:
        ExportError: a GPT-2 variant raybig's GPT does not compute (another activation, MLP width,
            epsilon, attention scaling).
    """
    C = int(cfg.get("n_embd", 768))
    odd = {k: cfg.get(k) for k, ok in (
        ("activation_function", cfg.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")),
        ("n_inner", cfg.get("n_inner") in (None, 4 * C)),
        ("layer_norm_epsilon", abs(float(cfg.get("layer_norm_epsilon", 1e-5)) - 1e-5) < 1e-12),
        ("scale_attn_weights", cfg.get("scale_attn_weights", True) is True),
        ("scale_attn_by_inverse_layer_idx", not cfg.get("scale_attn_by_inverse_layer_idx", False)),
        ("tie_word_embeddings", cfg.get("tie_word_embeddings", True) is True)) if not ok}
    if odd:
        raise ExportError(f"this GPT-2 variant is not raybig's GPT ({odd}); load it with transformers")
    return {"n_layer": int(cfg.get("n_layer", 12)), "n_head": int(cfg.get("n_head", 12)), "n_embd": C,
            "block_size": int(cfg.get("n_positions", 1024)), "vocab_size": int(cfg["vocab_size"]),
            "dropout": 0.0, "bias": True, "activation_checkpointing": False}


_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BIASES = ("ln_1.bias", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")


def raybig_state_dict(hf_sd: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """`GPT2LMHeadModel` weights -> raybig GPT weights: the inverse of `export_hf.gpt2_state_dict`.

    Conv1D weights (in, out) are transposed back to nn.Linear's (out, in); where raybig has
    `bias=False` the biases GPT-2 always has are dropped (they must be zero); the tied head
    `lm_head.weight` is set to the token embedding (raybig ties it again on load).

    Raises:
        ExportError: a key is missing, unexpected, or a bias raybig lacks is not zero.
    """
    bias = bool(model_cfg.get("bias", False))
    src = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
    src.pop("lm_head.weight", None)
    for k in [k for k in src if k.endswith((".attn.bias", ".attn.masked_bias"))]:
        src.pop(k)  # causal-mask buffers older transformers saved
    out: dict[str, torch.Tensor] = {}
    names = [f"h.{i}.{n}" for i in range(int(model_cfg["n_layer"]))
             for n in ("ln_1.weight", "ln_2.weight", *_TRANSPOSED, *_BIASES)]
    for key in ["wte.weight", "wpe.weight", *names, "ln_f.weight", "ln_f.bias"]:
        if key not in src:
            raise ExportError(f"not a GPT-2 of this shape: {key} is missing")
        t = src.pop(key)
        if key.endswith(".bias") and not bias:
            if bool(t.any()):
                raise ExportError(f"{key} is not zero but the model has bias=False")
            continue
        out[key] = t.t().contiguous() if key.endswith(_TRANSPOSED) else t
    if src:
        raise ExportError(f"not raybig's GPT: unexpected weights {sorted(src)[:5]}")
    out["lm_head.weight"] = out["wte.weight"]
    return out


def load_tokenizer(uri: str) -> Tokenizer:
    """The raybig tokenizer of the export at `uri`: bytes, or its BPE from the export's tokenizer.json.

    Raises:
        ExportError: a tokenizer raybig does not run itself (load it with transformers).
    """
    ex = resolve_export(uri)
    cfg = read_config(ex)
    name = (cfg.get(PROVENANCE) or {}).get("tokenizer") or cfg.get("tokenizer") or (
        "bytes" if int(cfg.get("vocab_size", 0)) == 256 else "hf")
    if name == "bytes":
        return BYTES
    if name == "bpe" and storage.exists(f"{ex}/{TOKENIZER_FILE}"):
        return BpeTokenizer.from_json(storage.read_text(f"{ex}/{TOKENIZER_FILE}"))
    raise ExportError(f"{ex}: tokenizer {name!r} is not one raybig runs (bytes or bpe); use transformers' "
                      "AutoTokenizer on the folder")


def load_model(uri: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The exported model (raybig's GPT, or a plug-in model), ready for inference, without DeepSpeed.

    Reads a new (save_pretrained) or an old raybig export. Returns (model, provenance): provenance
    has "model" (the config), "tokenizer" (name), "tied", "precision", "name", "format".
    """
    from raybig.model import GPT, GPTConfig

    sd, meta = read_export(uri)
    cfg = meta["model"]
    if "target" in cfg:
        from raybig.train.built import load_target

        fn = load_target(cfg["target"])
        model = fn(**cfg.get("kwargs", {}))
    else:
        known = set(GPTConfig.__dataclass_fields__)
        model = GPT(GPTConfig(**{**{k: v for k, v in cfg.items() if k in known},
                                 "activation_checkpointing": False, "dropout": 0.0}))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in set(meta.get("tied", []))]
    if missing or unexpected:
        raise ExportError(f"export does not match its model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval(), meta


# --------------------------------------------------------------------------- DeepSpeed checkpoints


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


def _consolidate_local(local: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    latest = os.path.join(local, "latest")
    if not os.path.exists(latest):
        raise ExportError(f"{local} is not a DeepSpeed checkpoint (no `latest` file)")
    with open(latest) as f:
        tag = f.read().strip()
    tag_dir = os.path.join(local, tag)
    if not os.path.isdir(tag_dir):
        raise IncompleteCheckpointError(f"checkpoint {local} is incomplete: `latest` names {tag!r}, "
                                        "which is not there")
    # zero_to_fp32 prints its progress and tqdm bars; keep the caller's output (`raybig export --json`) clean.
    with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):  # ZeRO 1-3 (and bf16 at stage 0)
            try:
                return dict(get_fp32_state_dict_from_zero_checkpoint(local, tag=tag))
            except (FileNotFoundError, ValueError) as e:
                raise IncompleteCheckpointError(f"checkpoint {local} is incomplete or corrupt: {e}") from None
        # Stage 0 in fp32: no ZeRO partitions; the whole model is in rank 0's model states.
        states = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
        if not os.path.exists(states):
            raise IncompleteCheckpointError(f"checkpoint {local} is incomplete: no model states in {tag}/")
        return dict(torch.load(states, map_location="cpu", weights_only=True)["module"])


def consolidate_checkpoint(uri: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint dir (any ZeRO stage, any fsspec URI).

    Consolidated with DeepSpeed's own `zero_to_fp32` routine (stage 0 fp32: rank 0's module states).

    Raises:
        ExportError: not a DeepSpeed checkpoint. IncompleteCheckpointError: files are missing.
    """
    from raybig.train.checkpoints import require_complete

    if not storage.exists(uri):
        raise ExportError(f"{uri}: no such checkpoint")
    require_complete(uri)
    with tempfile.TemporaryDirectory(prefix="raybig-export-ckpt-") as tmp:
        local = storage.download_dir(uri, tmp)
        if not os.path.exists(os.path.join(local, "latest")):
            raise ExportError(f"{uri} is not a DeepSpeed checkpoint (no `latest` file)")
        return _strip(_consolidate_local(local))


def load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Weights (raybig keys) from an export/run dir (either layout), or from a DeepSpeed checkpoint dir."""
    try:
        return read_export(uri)[0]
    except FileNotFoundError:
        pass
    try:
        return consolidate_checkpoint(uri)
    except ExportError:
        raise FileNotFoundError(f"{uri!r} is neither a raybig export nor a DeepSpeed checkpoint") from None


# --------------------------------------------------------------------------- `raybig export`


def _find_source(src: str) -> tuple[str, str, str | None]:
    """(kind, checkpoint-or-export URI, run dir or None) for a run dir, checkpoint dir or export dir."""
    from raybig.train.checkpoints import latest_checkpoint, newest_complete_checkpoint

    if not storage.exists(src):
        raise ExportError(f"{src}: no such run, checkpoint or export folder")
    if storage.exists(f"{src}/latest"):
        parent = src.rsplit("/", 1)[0]
        return "checkpoint", src, parent if storage.exists(f"{parent}/spec.yaml") else None
    if storage.exists(f"{src}/spec.yaml"):
        ckpt = latest_checkpoint(src) or newest_complete_checkpoint(src)
        if ckpt is None:
            if storage.exists(f"{src}/{EXPORT_DIR}/{CONFIG}"):
                return "export", f"{src}/{EXPORT_DIR}", src
            raise ExportError(f"the run {src} has no checkpoint yet (nothing to export)")
        return "checkpoint", ckpt, src
    if storage.exists(f"{src}/{CONFIG}"):
        return "export", src, None
    raise ExportError(f"{src} is not a run directory (spec.yaml), a DeepSpeed checkpoint (latest) "
                      f"or an export ({CONFIG})")


def _run_spec(run_dir: str | None, spec_path: str | None) -> Any:
    from raybig.spec import load_spec, load_spec_text

    if spec_path:
        spec = load_spec(spec_path)
    elif run_dir is not None:
        spec = load_spec_text(storage.read_text(f"{run_dir}/spec.yaml"))
    else:
        raise ExportError("a checkpoint outside its run directory needs --spec (the train spec that made it; "
                          "the GPT's shape is not in the weights)")
    if getattr(spec, "kind", None) != "train":
        raise ExportError(f"the spec is a {getattr(spec, 'kind', '?')!r} spec; exporting needs the train spec")
    return spec


def export_from(source: str, out_dir: str | None = None, spec_path: str | None = None) -> tuple[str, str]:
    """Write a save_pretrained export from a run, a checkpoint or an (old) export; return (out, what).

    Args:
        source: a run dir (its newest checkpoint), a DeepSpeed checkpoint dir of any ZeRO stage
            (consolidated with DeepSpeed's `zero_to_fp32`), or an export of either layout.
        out_dir: where to write (default: `<run>/export` for a run, `<run>/export-<checkpoint>`
            for a checkpoint; required for an export).
        spec_path: the train spec, for a checkpoint outside its run dir.

    Raises:
        ExportError (exit 2): not a run/checkpoint/export, no spec, weights that do not fit the spec.
        IncompleteCheckpointError (exit 1): a checkpoint with missing files.
    """
    src = storage.normalize(source)
    kind, where, run_dir = _find_source(src)
    if kind == "export":
        if out_dir is None:
            raise ExportError(f"{where} is already an export; give --out DIR to rewrite it as a "
                              "save_pretrained folder")
        sd, meta = read_export(where)
        cfg = meta["model"]
        if "target" not in cfg:
            cfg = {**cfg, "vocab_size": int(sd["wte.weight"].shape[0])}
        tok = load_tokenizer(where)
        out = write_export(run_dir or where, sd, cfg, tuple(meta.get("tied", ())),
                           meta.get("precision", "fp32"), meta.get("name", ""), tokenizer=tok, out_dir=out_dir)
        return out, f"export {where}"
    spec = _run_spec(run_dir, spec_path)
    sd = consolidate_checkpoint(where)
    if out_dir is not None:
        out = out_dir
    elif run_dir is None:
        out = f"{where}-{EXPORT_DIR}"
    elif src == run_dir:
        out = storage.join(run_dir, EXPORT_DIR)
    else:  # one checkpoint of a run: beside the run's own export, not over it
        out = storage.join(run_dir, f"{EXPORT_DIR}-{where.rsplit('/', 1)[-1]}")
    if getattr(spec.model, "is_hf", False):
        _export_hf_checkpoint(spec, sd, run_dir, out)
        return out, f"checkpoint {where}"
    from raybig.train.built import gpt_config

    model_cfg: dict[str, Any]
    if spec.model.target is not None:
        model_cfg = {"target": spec.model.target, "kwargs": dict(spec.model.kwargs),
                     "vocab_size": spec.model.vocab_size or 256, "seq_len": spec.data.seq_len}
        tied: tuple[str, ...] = ()
    else:
        if "wte.weight" not in sd:
            raise ExportError(f"{where}: the weights are not raybig's GPT (no wte.weight); is it this spec's run?")
        model_cfg = {**gpt_config(spec).to_dict(), "vocab_size": int(sd["wte.weight"].shape[0]),
                     "block_size": int(sd["wpe.weight"].shape[0])}
        tied = ("lm_head.weight",)
    from raybig.spec.deepspeed import resolve_precision

    try:
        write_export(run_dir or where, sd, model_cfg, tied, resolve_precision(spec), spec.name,
                     tokenizer=run_tokenizer(run_dir, "bpe" if spec.tokenizer_kind() == "bpe" else None),
                     out_dir=out)
    except ValueError as e:  # gpt2_state_dict: weights that are not this spec's GPT
        raise ExportError(f"{where}: the weights do not fit the spec's model: {e}") from None
    return out, f"checkpoint {where}"


def _export_hf_checkpoint(spec: Any, sd: dict[str, torch.Tensor], run_dir: str | None, out: str) -> None:
    """A Hugging Face model's checkpoint -> `save_hf_export` in the class it came from."""
    from raybig.train.export_hf import save_hf_export
    from raybig.train.hf import build_from_config
    from raybig.train.hf import load_tokenizer as hf_tokenizer

    m = spec.model
    if any("lora_" in k for k in sd):
        raise ExportError("a LoRA checkpoint holds the adapter only; use the export written at the end of "
                          "training (<run>/export), which has the adapter merged")
    folder = m.hf or m.hf_config
    model = build_from_config(folder, trust_remote_code=bool(getattr(m, "trust_remote_code", False)))
    kind = spec.tokenizer_kind()
    tok = hf_tokenizer(folder, check_model=False) if kind == "model" else run_tokenizer(run_dir, kind)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ExportError(f"the checkpoint does not fit {folder}: missing {sorted(set(missing) - tied)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    save_hf_export(model, tok, out)
