"""Hugging Face model folders without torch: checks, parameter counts, LoRA counts (spec layer).

`raybig validate` must not import torch (nor `transformers`, which imports torch), so everything
here reads JSON and safetensors headers by hand, through fsspec (a remote folder is checked with a
few small range reads, never downloaded):

- `inspect_folder` checks a `save_pretrained` folder (config.json, safetensors weights, an
  architecture transformers knows, `trust_remote_code`) and raises one-line errors;
- `weight_shapes` / `config_shapes` give `{parameter name: shape}` from the weights' headers or,
  with no weights (`model.hf_config`), from the config of a known architecture;
- `count_params` and `lora_trainable_params` turn those shapes into numbers for the ZeRO estimate.

The error classes are `RaybigError`s with exit code 2 (nothing was started); they live here
because this is the lowest layer that raises them (candidates for `raybig.errors`).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from raybig.errors import EXIT_SPEC, RaybigError

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")

HOW_TO_PROVIDE = ("give `model.hf:` a local folder (or fsspec URI) written by `save_pretrained`, e.g. "
                  "`model.save_pretrained(DIR); tokenizer.save_pretrained(DIR)` on a machine that has the "
                  "model, or `python scripts/make_tiny_hf.py DIR` for a tiny offline one")


class ModelSourceError(RaybigError):
    """A model source (`model.hf`, `model.hf_config`) cannot be used; exit 2 (nothing was started)."""

    exit_code = EXIT_SPEC


class ModelFolderError(ModelSourceError):
    """The folder does not exist, or lacks config.json or safetensors weights."""


class UnknownArchitectureError(ModelSourceError):
    """config.json names a model type that transformers has no causal-LM class for."""


class RemoteCodeRequiredError(ModelSourceError):
    """The model needs its own Python code (`auto_map`) and `trust_remote_code` is off."""


class HubModelNotCachedError(ModelSourceError):
    """A bare hub id is not in the local Hugging Face cache (raybig never downloads)."""


class TokenizerMismatchError(ModelSourceError):
    """The tokenizer has more tokens than the model has embedding rows."""


class LoraTargetError(ModelSourceError):
    """LoRA `target_modules` match no layer of the model."""


# --------------------------------------------------------------------------- files over fsspec


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    return fsspec.core.url_to_fs(uri)


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def read_json(uri: str) -> dict[str, Any]:
    """The JSON object in the file `uri` (local path or fsspec URI)."""
    fs, path = _fs(uri)
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def read_safetensors_header(uri: str) -> dict[str, dict[str, Any]]:
    """`{tensor name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}}` of one .safetensors file.

    Reads only the header: the format is an 8-byte little-endian unsigned header length N, then N
    bytes of JSON (https://github.com/huggingface/safetensors#format). The `__metadata__` entry is
    dropped. Raises ModelFolderError for a file too short or with a malformed header.
    """
    fs, path = _fs(uri)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelFolderError(f"{uri}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:  # the format caps headers at 100 MB
            raise ModelFolderError(f"{uri}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFolderError(f"{uri}: malformed safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header


# --------------------------------------------------------------------------- known architectures


HEAD_MAPPINGS = {"causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "masked_lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                 "classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"}
"""raybig task -> the transformers auto mapping whose model types have that task's head."""


@functools.lru_cache(maxsize=4)
def known_head_types(task: str) -> frozenset[str] | None:
    """Model types (`config.json` `model_type`) that have `task`'s head (`HEAD_MAPPINGS`).

    Read from the installed transformers' `models/auto/modeling_auto.py` with `ast` (importing it
    would import torch). None when transformers is absent or its layout changed (the check is then left to load time).
    """
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations or task not in HEAD_MAPPINGS:
        return None
    src = os.path.join(list(spec.submodule_search_locations)[0], "models", "auto", "modeling_auto.py")
    try:
        with open(src, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == HEAD_MAPPINGS[task]
                and isinstance(node.value, ast.Call) and node.value.args):
            try:
                return frozenset(k for k, _ in ast.literal_eval(node.value.args[0]))
            except ValueError:
                return None
    return None


def known_causal_lm_types() -> frozenset[str] | None:
    """Model types (`config.json` `model_type`) that `AutoModelForCausalLM` maps to a class.

    Read from the installed transformers' `models/auto/modeling_auto.py` with `ast` (importing it
    would import torch). None when transformers is absent or the file's layout changed; callers then
    leave the check to load time.
    """
    return known_head_types("causal_lm")


def check_architecture(config: Mapping[str, Any], trust_remote_code: bool, where: str) -> None:
    """Raise unless transformers can build a causal LM from `config` (a parsed config.json).

    Raises:
        RemoteCodeRequiredError: the config has `auto_map` for a model type transformers lacks and
            `trust_remote_code` is off.
        UnknownArchitectureError: no `model_type`, or one transformers does not know (and no
            `auto_map` to fall back on).
    """
    mt = config.get("model_type")
    known = known_causal_lm_types()
    auto_map = config.get("auto_map") or {}
    if known is not None and mt in known:
        return
    if auto_map:
        if not trust_remote_code:
            raise RemoteCodeRequiredError(
                f"{where}: model type {mt!r} needs its own code ({', '.join(sorted(auto_map))} in auto_map); "
                "set `model.trust_remote_code: true` only if you trust that folder's Python files")
        return
    if not mt:
        raise UnknownArchitectureError(f"{where}: config.json has no `model_type`")
    if known is not None:
        raise UnknownArchitectureError(
            f"{where}: model type {mt!r} is not a causal LM known to the installed transformers "
            "(upgrade transformers, or check config.json's model_type)")


# --------------------------------------------------------------------------- folder check


@dataclass(frozen=True)
class FolderInfo:
    """What `inspect_folder` found in a `save_pretrained` folder."""

    path: str
    """The folder (local path or fsspec URI) as given."""
    config: dict[str, Any]
    """Parsed config.json."""
    weight_files: tuple[str, ...] = ()
    """Safetensors file names relative to `path`, in index order; empty when weights were not required."""
    index: dict[str, Any] | None = None
    """Parsed model.safetensors.index.json when the weights are sharded."""
    files: frozenset[str] = field(default_factory=frozenset)
    """Names of the files directly in the folder."""

    @property
    def model_type(self) -> str:
        """config.json's `model_type` ("" if absent)."""
        return str(self.config.get("model_type", ""))

    @property
    def vocab_rows(self) -> int | None:
        """Embedding rows (`vocab_size`, or `text_config.vocab_size`), None if the config omits it."""
        v = self.config.get("vocab_size") or (self.config.get("text_config") or {}).get("vocab_size")
        return int(v) if v else None


def inspect_folder(folder: str, trust_remote_code: bool = False, require_weights: bool = True) -> FolderInfo:
    """Check a `save_pretrained` folder (local path or fsspec URI) without loading any weights.

    Args:
        folder: the folder.
        trust_remote_code: whether the spec allows the folder's own model code.
        require_weights: False for a config-only source (`model.hf_config` pointing at a folder).

    Returns:
        FolderInfo with the parsed config and the safetensors files.

    Raises:
        ModelFolderError: no such folder, no config.json, no safetensors weights (pickled
            `pytorch_model.bin` weights are refused: loading them can run code), or an index that
            names missing shards.
        UnknownArchitectureError, RemoteCodeRequiredError: see `check_architecture`.
    """
    fs, path = _fs(folder)
    if not fs.isdir(path):
        raise ModelFolderError(f"{folder}: no such folder; {HOW_TO_PROVIDE}")
    files = frozenset(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    if CONFIG not in files:
        raise ModelFolderError(f"{folder}: no config.json, so not a save_pretrained folder; {HOW_TO_PROVIDE}")
    try:
        config = read_json(_join(folder, CONFIG))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{folder}/config.json: not valid JSON ({e})") from None
    check_architecture(config, trust_remote_code, folder)
    if not require_weights:
        return FolderInfo(folder, config, files=files)
    if SAFETENSORS_INDEX in files:
        index = read_json(_join(folder, SAFETENSORS_INDEX))
        shards = tuple(dict.fromkeys((index.get("weight_map") or {}).values()))
        missing = [s for s in shards if s not in files]
        if not shards or missing:
            raise ModelFolderError(f"{folder}: {SAFETENSORS_INDEX} names missing shards {missing[:3]} "
                                   "(an incomplete copy?)")
        return FolderInfo(folder, config, shards, index, files)
    if SAFETENSORS in files:
        return FolderInfo(folder, config, (SAFETENSORS,), None, files)
    if any(p in files for p in PICKLE_WEIGHTS):
        raise ModelFolderError(
            f"{folder}: weights are pickled (pytorch_model.bin), which can run code when loaded; re-save "
            "them as safetensors with `model.save_pretrained(DIR, safe_serialization=True)`")
    raise ModelFolderError(f"{folder}: no weights ({SAFETENSORS} or {SAFETENSORS_INDEX}); for a random "
                           f"init from the config alone use `model.hf_config:`; else {HOW_TO_PROVIDE}")


# --------------------------------------------------------------------------- shapes and counts

_DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "float16": 2, "half": 2, "fp16": 2, "bfloat16": 2,
                "bf16": 2, "float64": 8, "double": 8, "int8": 1, "uint8": 1, "float8_e4m3fn": 1,
                "float8_e5m2": 1}


def weight_shapes(info: FolderInfo) -> dict[str, tuple[int, ...]]:
    """`{tensor name: shape}` of every tensor in the folder's safetensors files (headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in info.weight_files:
        for k, v in read_safetensors_header(_join(info.path, name)).items():
            shapes[k] = tuple(int(d) for d in v["shape"])
    return shapes


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    v = cfg.get(key)
    return default if v is None else v


# Defaults of the transformers config classes, for hand-written `hf_config` dicts that omit fields.
_DECODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, tie_word_embeddings=False),
}
CONFIG_COUNTED = ("gpt2", "bert", *_DECODER_DEFAULTS)
"""Architectures whose parameter shapes `config_shapes` derives from config.json alone."""


def _bert_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    # BertForMaskedLM (transformers' modeling_bert): post-norm encoder blocks, an MLM head whose
    # decoder is tied to the word embeddings (only its bias is its own). Defaults: BertConfig's.
    V, H = int(_get(cfg, "vocab_size", 30522)), int(_get(cfg, "hidden_size", 768))
    I_, L = int(_get(cfg, "intermediate_size", 3072)), int(_get(cfg, "num_hidden_layers", 12))
    P, Tt = int(_get(cfg, "max_position_embeddings", 512)), int(_get(cfg, "type_vocab_size", 2))
    e = "bert.embeddings."
    out: dict[str, tuple[int, ...]] = {e + "word_embeddings.weight": (V, H), e + "position_embeddings.weight": (P, H),
                                       e + "token_type_embeddings.weight": (Tt, H), e + "LayerNorm.weight": (H,),
                                       e + "LayerNorm.bias": (H,)}
    for i in range(L):
        b = f"bert.encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out[f"{b}{m}.weight"], out[f"{b}{m}.bias"] = (H, H), (H,)
        out[b + "intermediate.dense.weight"], out[b + "intermediate.dense.bias"] = (I_, H), (I_,)
        out[b + "output.dense.weight"], out[b + "output.dense.bias"] = (H, I_), (H,)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            out[f"{b}{n}.weight"], out[f"{b}{n}.bias"] = (H,), (H,)
    h = "cls.predictions."
    out.update({h + "transform.dense.weight": (H, H), h + "transform.dense.bias": (H,),
                h + "transform.LayerNorm.weight": (H,), h + "transform.LayerNorm.bias": (H,), h + "bias": (V,)})
    return out


def _decoder_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    # Llama family (transformers' modeling_llama / mistral / qwen2 / qwen3): pre-norm RMSNorm blocks,
    # GQA attention (k/v have num_key_value_heads * head_dim rows), SwiGLU MLP gate/up/down.
    mt = cfg["model_type"]
    d = _DECODER_DEFAULTS[mt]
    V, H = int(_get(cfg, "vocab_size", d["vocab_size"])), int(_get(cfg, "hidden_size", d["hidden_size"]))
    I_ = int(_get(cfg, "intermediate_size", d["intermediate_size"]))
    L = int(_get(cfg, "num_hidden_layers", d["num_hidden_layers"]))
    nh = int(_get(cfg, "num_attention_heads", d["num_attention_heads"]))
    kv = int(_get(cfg, "num_key_value_heads", d.get("num_key_value_heads", nh)))
    hd = int(_get(cfg, "head_dim", d.get("head_dim", H // nh)))
    qkv_bias = True if mt == "qwen2" else bool(_get(cfg, "attention_bias", False)) and mt != "mistral"
    o_bias = bool(_get(cfg, "attention_bias", False)) and mt in ("llama", "qwen3")
    mlp_bias = bool(_get(cfg, "mlp_bias", False)) and mt == "llama"
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        for n, rows in (("q_proj", nh * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            s[f"{p}self_attn.{n}.weight"] = (rows, H)
            if qkv_bias:
                s[f"{p}self_attn.{n}.bias"] = (rows,)
        s[f"{p}self_attn.o_proj.weight"] = (H, nh * hd)
        if o_bias:
            s[f"{p}self_attn.o_proj.bias"] = (H,)
        if mt == "qwen3":  # per-head RMSNorm on q and k
            s[f"{p}self_attn.q_norm.weight"] = (hd,)
            s[f"{p}self_attn.k_norm.weight"] = (hd,)
        for n, shape in (("gate_proj", (I_, H)), ("up_proj", (I_, H)), ("down_proj", (H, I_))):
            s[f"{p}mlp.{n}.weight"] = shape
            if mlp_bias:
                s[f"{p}mlp.{n}.bias"] = (shape[0],)
        s[f"{p}input_layernorm.weight"] = (H,)
        s[f"{p}post_attention_layernorm.weight"] = (H,)
    s["model.norm.weight"] = (H,)
    if not _get(cfg, "tie_word_embeddings", d["tie_word_embeddings"]):
        s["lm_head.weight"] = (V, H)
    return s


def _gpt2_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    # transformers' modeling_gpt2: Conv1D weights are (in, out); LayerNorms have weight and bias;
    # the head is tied to wte (GPT2LMHeadModel always ties by default).
    V, P = int(_get(cfg, "vocab_size", 50257)), int(_get(cfg, "n_positions", 1024))
    E, L = int(_get(cfg, "n_embd", 768)), int(_get(cfg, "n_layer", 12))
    inner = int(_get(cfg, "n_inner", 4 * E))
    s: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, E), "transformer.wpe.weight": (P, E)}
    for i in range(L):
        p = f"transformer.h.{i}."
        for n, (a, b) in (("attn.c_attn", (E, 3 * E)), ("attn.c_proj", (E, E)),
                          ("mlp.c_fc", (E, inner)), ("mlp.c_proj", (inner, E))):
            s[f"{p}{n}.weight"], s[f"{p}{n}.bias"] = (a, b), (b,)
        for n in ("ln_1", "ln_2"):
            s[f"{p}{n}.weight"], s[f"{p}{n}.bias"] = (E,), (E,)
    s["transformer.ln_f.weight"], s["transformer.ln_f.bias"] = (E,), (E,)
    if not _get(cfg, "tie_word_embeddings", True):
        s["lm_head.weight"] = (V, E)
    return s


def raybig_gpt_shapes(n_layer: int, n_embd: int, vocab_size: int, block_size: int,
                      bias: bool = False) -> dict[str, tuple[int, ...]]:
    """`{parameter name: shape}` of raybig's own GPT (`raybig/model.py`), for LoRA counts.

    nn.Linear weights are (out, in): c_attn (3C, C), attn c_proj (C, C), mlp c_fc (4C, C), mlp c_proj
    (C, 4C); the head is tied to `wte` and not listed (as `named_parameters` does).
    """
    C = n_embd
    s: dict[str, tuple[int, ...]] = {"wte.weight": (vocab_size, C), "wpe.weight": (block_size, C)}
    for i in range(n_layer):
        for n, shape in (("ln_1", (C,)), ("attn.c_attn", (3 * C, C)), ("attn.c_proj", (C, C)),
                         ("ln_2", (C,)), ("mlp.c_fc", (4 * C, C)), ("mlp.c_proj", (C, 4 * C))):
            s[f"h.{i}.{n}.weight"] = shape
            if bias:
                s[f"h.{i}.{n}.bias"] = (shape[0],)
    s["ln_f.weight"] = (C,)
    if bias:
        s["ln_f.bias"] = (C,)
    return s


def config_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """`{parameter name: shape}` (transformers' names) of a known architecture from its config alone.

    Supports `CONFIG_COUNTED` (gpt2, llama, mistral, qwen2, qwen3); omitted fields take the
    transformers config class's defaults. A tied head is not listed (it shares the embedding).

    Raises:
        UnknownArchitectureError: any other `model_type`.
    """
    mt = config.get("model_type")
    if mt == "gpt2":
        return _gpt2_shapes(config)
    if mt == "bert":
        return _bert_shapes(config)
    if mt in _DECODER_DEFAULTS:
        return _decoder_shapes(config)
    raise UnknownArchitectureError(
        f"cannot count the parameters of model type {mt!r} from its config alone (known: "
        f"{', '.join(CONFIG_COUNTED)}); point `model.hf` at a folder with safetensors weights instead")


def count_params(source: str | FolderInfo | Mapping[str, Any], trust_remote_code: bool = False) -> int:
    """Number of parameters (elements; a tied head counted once) of an HF model, without torch.

    Args:
        source: a folder (path/URI or `FolderInfo`): counted from its safetensors headers; or a
            config dict (`model.hf_config`): counted from `config_shapes`.
        trust_remote_code: passed to `inspect_folder`.

    Falls back to the index's `metadata.total_size` (bytes) divided by the bytes of the config's
    `dtype`/`torch_dtype` when a shard's header cannot be read.

    Raises:
        ModelFolderError, UnknownArchitectureError, RemoteCodeRequiredError.
    """
    if isinstance(source, Mapping):
        return sum(math.prod(s) for s in config_shapes(source).values())
    info = source if isinstance(source, FolderInfo) else inspect_folder(source, trust_remote_code)
    try:
        return sum(math.prod(s) for s in weight_shapes(info).values())
    except (OSError, ModelFolderError):
        total = ((info.index or {}).get("metadata") or {}).get("total_size")
        dtype = str(info.config.get("dtype") or info.config.get("torch_dtype") or "float32")
        if total is None or dtype not in _DTYPE_BYTES:
            raise
        return int(total) // _DTYPE_BYTES[dtype]


def _matches(module: str, targets: str | Iterable[str]) -> bool:
    # peft's rule (tuners_utils.check_target_module_exists): a string is a regex that must match the
    # whole module name; a list matches a module named exactly so or ending in "." + the entry.
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


_NOT_LINEAR = re.compile(r"(^|\.)(lm_head|wte|wpe|embed_tokens|embed_positions|[^.]*embedding[^.]*)$")


def lora_targets(shapes: Mapping[str, tuple[int, ...]], target_modules: str | Iterable[str]) -> list[str]:
    """Module names (weight name minus `.weight`) of 2-D weights that LoRA `target_modules` select.

    `"all-linear"` selects every 2-D weight except embeddings and the output head (peft's meaning).
    """
    mods = [k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]
    if target_modules == "all-linear":
        return [m for m in mods if not _NOT_LINEAR.search(m)]
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return [m for m in mods if _matches(m, targets)]


def lora_trainable_params(shapes: Mapping[str, tuple[int, ...]], r: int,
                          target_modules: str | Iterable[str]) -> int:
    """Trainable parameters of a LoRA adapter of rank `r` on the modules `target_modules` selects.

    Each selected weight of shape (a, b) gets A (r x in) and B (out x r): r * (a + b) elements,
    whichever of a, b is the input (nn.Linear stores (out, in), GPT-2's Conv1D (in, out)); biases
    stay frozen (peft's default `bias="none"`). Source: Hu et al. 2021, LoRA, section 4.

    Raises:
        LoraTargetError: `target_modules` select nothing; the message lists the model's layer names.
    """
    mods = lora_targets(shapes, target_modules)
    if not mods:
        leaves = sorted({k[: -len(".weight")].rsplit(".", 1)[-1] for k, s in shapes.items()
                         if k.endswith(".weight") and len(s) == 2})
        raise LoraTargetError(f"finetune.target_modules {target_modules!r} match no layer of the model; "
                              f"its 2-D layers are named: {', '.join(leaves)}")
    return sum(r * sum(shapes[m + ".weight"]) for m in mods)


# --------------------------------------------------------------------------- validate-time checks

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")


def looks_like_hub_id(source: str) -> bool:
    """Whether `source` reads as a bare hub id (`org/name`) rather than a path or URI."""
    return (not source.startswith((".", "/", "~")) and "://" not in source and "\\" not in source
            and bool(_HUB_ID.match(source)))


def find_hub_snapshot(repo_id: str) -> str | None:
    """The local Hugging Face cache snapshot folder of `repo_id`, or None (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(repo_id, CONFIG)
    return os.path.dirname(hit) if isinstance(hit, str) else None


def locate_source(source: str) -> str:
    """A `model.hf` value -> the folder to inspect.

    A local path is made absolute, a URI kept as is, a hub id replaced by its cached snapshot.

    Raises:
        HubModelNotCachedError: a bare hub id that is not a folder and not in the local cache.
    """
    if source.startswith("file://"):
        source = source[len("file://"):]
    if "://" in source:
        return source
    local = os.path.abspath(os.path.expanduser(source))
    if os.path.exists(local) or not looks_like_hub_id(source):
        return local
    found = find_hub_snapshot(source)
    if found is None:
        raise HubModelNotCachedError(f"{source!r} is not a folder and not in the local Hugging Face cache "
                                     f"(raybig never downloads); {HOW_TO_PROVIDE}")
    return found


def config_of(hf_config: str | Mapping[str, Any], trust_remote_code: bool = False) -> dict[str, Any]:
    """The config dict `model.hf_config` names (inline mapping, config.json file, or folder), checked.

    Raises:
        ModelFolderError: no such file/folder or no config.json. UnknownArchitectureError,
        RemoteCodeRequiredError: see `check_architecture`.
    """
    if isinstance(hf_config, Mapping):
        cfg = dict(hf_config)
        check_architecture(cfg, trust_remote_code, "model.hf_config")
        return cfg
    fs, path = _fs(hf_config)
    if fs.isdir(path):
        return dict(inspect_folder(hf_config, trust_remote_code, require_weights=False).config)
    if not fs.exists(path):
        raise ModelFolderError(f"{hf_config}: no such config file or folder; {HOW_TO_PROVIDE}")
    try:
        cfg = read_json(hf_config)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{hf_config}: not valid JSON ({e})") from None
    check_architecture(cfg, trust_remote_code, hf_config)
    return cfg


def embedding_rows(config: Mapping[str, Any]) -> int | None:
    """The model's embedding rows (`vocab_size`, or `text_config.vocab_size`); None if unknown."""
    v = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if v is None and config.get("model_type") in _DECODER_DEFAULTS:
        v = _DECODER_DEFAULTS[str(config["model_type"])]["vocab_size"]
    return int(v) if v else None


def tokenizer_vocab_size(folder: str) -> int | None:
    """Ids of the folder's tokenizer.json (max id + 1, added tokens included), without transformers.

    None when the folder has no tokenizer.json (a sentencepiece-only tokenizer is checked at load).
    """
    fs, path = _fs(folder)
    tj = _join(path, "tokenizer.json")
    if not fs.exists(tj):
        return None
    with fs.open(tj, "rb") as f:
        tok = json.loads(f.read().decode("utf-8"))
    vocab = (tok.get("model") or {}).get("vocab")
    ids: list[int] = [int(a["id"]) for a in tok.get("added_tokens") or [] if "id" in a]
    if isinstance(vocab, dict):
        ids += [int(i) for i in vocab.values()]
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = position
        ids.append(len(vocab) - 1)
    return max(ids) + 1 if ids else None


def mask_token_id(folder: str) -> int | None:
    """The id of the folder's tokenizer's mask token ([MASK], <mask>), read from its JSON files; None if none.

    The token comes from tokenizer_config.json or special_tokens_map.json (`mask_token`), its id from
    tokenizer.json (added tokens, then the model's vocabulary).
    """
    fs, path = _fs(folder)
    token = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = _join(path, name)
        if token is None and fs.exists(f):
            with fs.open(f, "rb") as fh:
                v = json.loads(fh.read().decode("utf-8")).get("mask_token")
            token = v.get("content") if isinstance(v, dict) else v
    tj = _join(path, "tokenizer.json")
    if token is None or not fs.exists(tj):
        return None
    with fs.open(tj, "rb") as fh:
        tok = json.loads(fh.read().decode("utf-8"))
    for a in tok.get("added_tokens") or []:
        if a.get("content") == token and "id" in a:
            return int(a["id"])
    vocab = (tok.get("model") or {}).get("vocab")
    return int(vocab[token]) if isinstance(vocab, dict) and token in vocab else None


def has_tokenizer(folder: str) -> bool:
    """Whether `folder` holds tokenizer files `AutoTokenizer` can read."""
    fs, path = _fs(folder)
    return any(fs.exists(_join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "raybig": ("c_attn",), "gpt2": ("c_attn",), "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"),
}
"""LoRA `target_modules` when the spec names none (peft's own defaults for these families)."""


def hf_model_info(hf: str | None, hf_config: str | dict[str, Any] | None,
                  trust_remote_code: bool) -> dict[str, Any]:
    """What validation needs of a Hugging Face source, read without torch and cached per process.

    Returns:
        {"folder": local folder or URI (None for an inline config), "config": config dict,
         "shapes": {parameter name: shape} from safetensors headers (or the config for hf_config)}.

    Raises:
        raybig.spec.hf_params.ModelSourceError subclasses (one line each).
    """
    key = json.dumps(hf_config, sort_keys=True) if isinstance(hf_config, dict) else hf_config
    return dict(_hf_info(hf, key, trust_remote_code, _stamp(hf or (hf_config if isinstance(hf_config, str)
                                                                    else None))))


def _stamp(path: str | None) -> float:
    # config.json's mtime: a folder rewritten in place (tests, make_tiny_hf) is read afresh.
    if path is None or "://" in path:
        return 0.0
    for p in (os.path.join(path, "config.json"), path):
        if os.path.exists(p):
            return os.path.getmtime(p)
    return 0.0


@functools.lru_cache(maxsize=32)
def _hf_info(hf: str | None, hf_config: str | None, trust_remote_code: bool, stamp: float) -> dict[str, Any]:
    if hf is not None:
        folder = locate_source(hf)
        info = inspect_folder(folder, trust_remote_code)
        return {"folder": folder, "config": info.config, "shapes": weight_shapes(info)}
    assert hf_config is not None
    inline = hf_config.startswith("{")
    cfg = config_of(json.loads(hf_config) if inline else hf_config, trust_remote_code)
    where = None if inline else (hf_config if os.path.isdir(hf_config) else os.path.dirname(hf_config))
    return {"folder": where, "config": cfg, "shapes": config_shapes(cfg)}
