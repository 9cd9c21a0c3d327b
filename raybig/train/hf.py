"""Hugging Face models and tokenizers: find the folder, check it, load it (ZeRO-3 aware).

A model source (`model.hf`) is one of:
- a local `save_pretrained` folder;
- an fsspec URI of one (`s3://...`, `gs://...`): fetched once per node into a local cache keyed by
  the URI and every file's size and mtime, published by an atomic rename (a half-download is never
  used) under a file lock (the ranks of one node fetch it once);
- a bare hub id (`org/name`): looked up only in the local Hugging Face cache (`HF_HUB_CACHE`),
  never downloaded; a miss is a one-line `HubModelNotCachedError` saying how to provide a folder.

Weights load only from safetensors, and `trust_remote_code` is off unless the caller turns it on.
The folder checks and errors themselves are torch-free and live in `raybig.spec.hf_params`, so
`raybig validate` raises the same errors without importing torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from raybig.spec.hf_params import (
    CONFIG,
    HOW_TO_PROVIDE,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    FolderInfo,
    HubModelNotCachedError,
    LoraTargetError,
    ModelFolderError,
    ModelSourceError,
    RemoteCodeRequiredError,
    TokenizerMismatchError,
    UnknownArchitectureError,
    check_architecture,
    inspect_folder,
)

__all__ = [
    "HFTokenizer", "HubModelNotCachedError", "LoraTargetError", "ModelFolderError", "ModelSourceError",
    "RemoteCodeRequiredError", "TokenizerMismatchError", "UnknownArchitectureError", "build_from_config",
    "build_head_model",
    "check_tokenizer_fits",
    "default_cache_dir", "fetch_remote_folder", "find_in_hub_cache", "load_causal_lm", "load_tokenizer",
    "register_zero3", "resolve_model_source", "torch_dtype",
]

# A hub id: "name" or "org/name", letters, digits, "-", "_", "." (huggingface_hub's validate_repo_id).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")


def default_cache_dir() -> str:
    """Local cache for remote model folders.

    `$RAYBIG_HF_CACHE`, else `$RAYBIG_HOME/hf-cache`, else `~/.cache/raybig/hf`.
    """
    if os.environ.get("RAYBIG_HF_CACHE"):
        return os.path.expanduser(os.environ["RAYBIG_HF_CACHE"])
    if os.environ.get("RAYBIG_HOME"):
        return os.path.join(os.path.expanduser(os.environ["RAYBIG_HOME"]), "hf-cache")
    return os.path.expanduser("~/.cache/raybig/hf")


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_weight_file(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")) and \
        not name.endswith(".index.json")


def fetch_remote_folder(uri: str, cache_dir: str | None = None, weights: bool = True) -> str:
    """Copy the remote folder `uri` (any fsspec URI) into the local cache once; return the local path.

    The cache entry is `<cache_dir>/<sha256 of uri + each file's name, size, mtime>[:16]`, so a
    changed file fetches a new copy. The copy goes to a temporary sibling, then is renamed into place:
    a crash mid-download leaves only a temporary folder, which the next call discards. A file lock
    makes concurrent callers on one node (the ranks) wait for the first one's copy, so each node
    downloads the folder once, whatever its number of ranks.

    Args:
        uri: the remote folder.
        cache_dir: the local cache (default `default_cache_dir()`).
        weights: False: leave the weight files out (config and tokenizer only, e.g. for the driver,
            which needs the tokenizer but never the weights); a separate, small cache entry.

    Raises:
        ModelFolderError: the URI is not a folder.
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.isdir(path):
        raise ModelFolderError(f"{uri}: no such folder; {HOW_TO_PROVIDE}")
    listing = fs.find(path, detail=True)
    base = path.rstrip("/") + "/"
    entries = []
    for p, info in sorted(listing.items()):
        stamp = next((info[k] for k in ("mtime", "LastModified", "updated", "last_modified", "ETag", "etag")
                      if info.get(k) is not None), "")
        rel = p[len(base):] if p.startswith(base) else p
        if weights or not _is_weight_file(rel):
            entries.append((rel, int(info.get("size") or 0), str(stamp)))
    key = hashlib.sha256(json.dumps([uri, entries]).encode()).hexdigest()[:16]
    root = cache_dir or default_cache_dir()
    final = os.path.join(root, key)
    with _locked(os.path.join(root, f".{key}.lock")):
        if os.path.isdir(final):
            return final
        for stale in os.listdir(root):  # leftovers of a crashed fetch of this entry
            if stale.startswith(f".{key}.tmp-"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root)
        for rel, _, _ in entries:
            dest = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.get_file(base + rel, dest)
        os.rename(tmp, final)
    return final


def find_in_hub_cache(repo_id: str, cache_dir: str | None = None, revision: str | None = None) -> str | None:
    """The local snapshot folder of hub model `repo_id` in the Hugging Face cache, or None.

    Only the cache is read (`huggingface_hub.try_to_load_from_cache`, which honours `HF_HUB_CACHE`
    / `HF_HOME`); nothing is downloaded, as with `HF_HUB_OFFLINE=1`.
    """
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, CONFIG, cache_dir=cache_dir, revision=revision)
    return os.path.dirname(hit) if isinstance(hit, str) else None


def _looks_like_hub_id(source: str) -> bool:
    return (not source.startswith((".", "/", "~")) and "://" not in source and "\\" not in source
            and bool(_HUB_ID.match(source)))


def resolve_model_source(source: str, trust_remote_code: bool = False, cache_dir: str | None = None,
                         require_weights: bool = True, hub_cache_dir: str | None = None) -> str:
    """A model source (folder, fsspec URI or cached hub id) -> a checked local folder path.

    Args:
        source: see the module docstring.
        trust_remote_code: allow a folder whose model needs its own code.
        cache_dir: local cache for remote URIs (default `default_cache_dir()`).
        require_weights: False when only the config or tokenizer is needed (a remote folder is then
            fetched without its weight files).
        hub_cache_dir: the Hugging Face cache (default: huggingface_hub's, from the environment).

    Raises:
        ModelFolderError, UnknownArchitectureError, RemoteCodeRequiredError: the folder fails
            `raybig.spec.hf_params.inspect_folder`.
        HubModelNotCachedError: `source` is a hub id not in the local cache.
    """
    if source.startswith("file://"):
        source = source[len("file://"):]
    if "://" in source:
        local = fetch_remote_folder(source, cache_dir, weights=require_weights)
    elif os.path.exists(os.path.expanduser(source)) or not _looks_like_hub_id(source):
        local = os.path.abspath(os.path.expanduser(source))
    else:
        found = find_in_hub_cache(source, hub_cache_dir)
        if found is None:
            raise HubModelNotCachedError(
                f"{source!r} is not a folder and not in the local Hugging Face cache (raybig never "
                f"downloads); {HOW_TO_PROVIDE}")
        local = found
    inspect_folder(local, trust_remote_code=trust_remote_code, require_weights=require_weights)
    return local


def torch_dtype(dtype: Any) -> Any:
    """A dtype name -> torch.dtype for from_pretrained.

    "auto"/None -> "auto"; "bf16"/"bfloat16", "fp16"/"float16", "fp32"/"float32" or a torch.dtype ->
    the torch.dtype. Raises ValueError for anything else.
    """
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return "auto" if dtype is None else dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if str(dtype) not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[str(dtype)]


def register_zero3(ds_config: Mapping[str, Any] | None) -> Any:
    """Register a DeepSpeed config with transformers so that models built next use `zero.Init`.

    With ZeRO stage 3, `from_pretrained`/`from_config` then create every parameter already partitioned
    across the ranks (`deepspeed.zero.Init`) and `from_pretrained` scatters the checkpoint into the
    partitions; no rank ever holds the whole model. transformers keeps only a weak reference
    (`transformers.integrations.deepspeed.HfDeepSpeedConfig`), so the returned object must stay alive
    as long as the model is used (`load_causal_lm` attaches it to the model). Note that zero.Init
    creates parameters in the config's dtype (bf16/fp16 when enabled there). Returns None (and
    registers nothing) for no config or a stage below 3.

    Raises:
        ModelSourceError: stage 3 but torch.distributed is not initialised (Ray Train's DeepSpeed
            workers are; elsewhere call `deepspeed.init_distributed()` first).
    """
    if not ds_config or int((ds_config.get("zero_optimization") or {}).get("stage", 0)) != 3:
        return None
    import torch.distributed as dist
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    if not (dist.is_available() and dist.is_initialized()):
        raise ModelSourceError("a ZeRO-3 model load needs torch.distributed initialised first "
                               "(deepspeed.init_distributed())")
    return HfDeepSpeedConfig(dict(ds_config))


def load_causal_lm(source: str, dtype: Any = "auto", trust_remote_code: bool = False,
                   zero3_config: Mapping[str, Any] | None = None, cache_dir: str | None = None) -> Any:
    """`AutoModelForCausalLM.from_pretrained` on a resolved, checked folder; offline, safetensors only.

    Args:
        source: folder, fsspec URI or cached hub id (see `resolve_model_source`).
        dtype: "auto" (config.json's dtype), "bf16", "fp16", "fp32" or a torch.dtype.
        trust_remote_code: allow the folder's own model code.
        zero3_config: the DeepSpeed config dict when training at ZeRO stage 3 (see `register_zero3`;
            torch.distributed must be initialised). transformers reads the shards on rank 0 and
            broadcasts each parameter into its partition.
        cache_dir: local cache for remote URIs.

    Returns:
        The model (a `transformers.PreTrainedModel`), in eval mode as from_pretrained leaves it; call
        `.train()` before training.

    Raises:
        ModelFolderError, UnknownArchitectureError, RemoteCodeRequiredError, HubModelNotCachedError;
        ModelSourceError for ZeRO-3 without torch.distributed.
    """
    folder = resolve_model_source(source, trust_remote_code, cache_dir)
    keep = register_zero3(zero3_config)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
        local_files_only=True, use_safetensors=True)
    if keep is not None:
        model._raybig_ds_config = keep  # transformers holds only a weakref; keep it alive with the model
    return model


def _config_dict(config: Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    path = os.path.expanduser(config)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG)
    if not os.path.exists(path):
        raise ModelFolderError(f"{config}: no config.json there; {HOW_TO_PROVIDE}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_from_config(config: Mapping[str, Any] | str, dtype: Any = None, trust_remote_code: bool = False,
                      zero3_config: Mapping[str, Any] | None = None, seed: int | None = None) -> Any:
    """A randomly initialised causal LM from a config alone (`model.hf_config`), e.g. to pretrain.

    Args:
        config: a config dict with `model_type` (other fields default as in the transformers config
            class), or the path of a config.json or of a folder holding one.
        dtype: parameter dtype (see `torch_dtype`); None keeps torch's default (fp32).
        trust_remote_code: allow `auto_map` code (only for a folder path).
        zero3_config: DeepSpeed config for ZeRO-3 (`register_zero3`): the model is built partitioned.
        seed: if given, `torch.manual_seed(seed)` first, for a reproducible init.

    Raises:
        ModelFolderError: a path without config.json. UnknownArchitectureError,
        RemoteCodeRequiredError: as `check_architecture`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, str) and not os.path.exists(os.path.expanduser(config)) and (
            "://" in config or _looks_like_hub_id(config)):  # a remote folder or hub id: its config only
        config = resolve_model_source(config, trust_remote_code, require_weights=False)
    cfg = _config_dict(config)
    where = config if isinstance(config, str) else "model.hf_config"
    check_architecture(cfg, trust_remote_code, where)
    if not trust_remote_code:  # a known model type: use transformers' own class, not the folder's code
        cfg.pop("auto_map", None)
    mt = cfg.pop("model_type")
    hf_cfg = AutoConfig.for_model(mt, **{k: v for k, v in cfg.items() if k != "transformers_version"})
    keep = register_zero3(zero3_config)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = torch_dtype(dtype)
    model = AutoModelForCausalLM.from_config(hf_cfg, **kwargs)
    if keep is not None:
        model._raybig_ds_config = keep
    return model


class HFTokenizer:
    """A model's own tokenizer (`AutoTokenizer`) behind raybig's `Tokenizer` protocol.

    BOS/EOS follow the model's tokenizer config: `encode` adds what the tokenizer adds by default
    (a BOS for Llama-style tokenizers whose post-processor / `add_bos_token` say so, nothing for
    GPT-2 or Qwen), which is what a prompt needs; `encode_document` also appends EOS, which is what
    packed training documents need so the model learns where a document ends.

    Attributes:
        hf: the transformers tokenizer. name: "hf:<folder name>". vocab_size: `len(hf)`, added
        tokens included (what must fit the embedding rows). bos_id, eos_id, pad_id: ids or None
        (pad falls back to EOS, as generation in transformers does).
    """

    def __init__(self, hf: Any, name: str = "hf"):
        self.hf = hf
        self.name = name
        self.vocab_size = len(hf)
        self.bos_id = hf.bos_token_id
        self.eos_id = hf.eos_token_id
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id

    @property
    def adds_bos(self) -> bool:
        """Whether `encode` starts with BOS (read off the tokenizer's own behaviour)."""
        ids = self.hf("a", add_special_tokens=True)["input_ids"]
        return self.bos_id is not None and bool(ids) and ids[0] == self.bos_id

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with the special tokens the tokenizer adds by default (e.g. BOS)."""
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def encode_document(self, text: str) -> list[int]:
        """`encode(text)` plus a final EOS (when the tokenizer has one) for packed training data."""
        ids = self.encode(text)
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        return str(self.hf.decode([int(i) for i in ids], skip_special_tokens=True))

    def save(self, out_dir: str) -> None:
        """`save_pretrained` the tokenizer files into `out_dir`."""
        self.hf.save_pretrained(out_dir)


def check_tokenizer_fits(vocab_size: int, embedding_rows: int | None, where: str) -> None:
    """Raise TokenizerMismatchError if a tokenizer of `vocab_size` ids overflows `embedding_rows`.

    Fewer ids than rows is fine (models pad their embedding to a multiple of 64 or 128).
    """
    if embedding_rows is not None and vocab_size > embedding_rows:
        raise TokenizerMismatchError(
            f"{where}: the tokenizer has {vocab_size} tokens but the model only {embedding_rows} embedding "
            "rows; use the tokenizer saved with this model (or resize the embeddings before saving it)")


def load_tokenizer(source: str, trust_remote_code: bool = False, cache_dir: str | None = None,
                   check_model: bool = True) -> HFTokenizer:
    """The model's own tokenizer from its folder (`AutoTokenizer.from_pretrained`, offline).

    Args:
        source: folder, fsspec URI or cached hub id (see `resolve_model_source`).
        trust_remote_code: allow a custom tokenizer class's code.
        cache_dir: local cache for remote URIs.
        check_model: also check the tokenizer fits the model's `vocab_size` from config.json.

    Raises:
        ModelFolderError: no tokenizer files. TokenizerMismatchError: more tokens than embedding
        rows. The errors of `resolve_model_source`.
    """
    folder = resolve_model_source(source, trust_remote_code, cache_dir, require_weights=False)
    from transformers import AutoTokenizer

    if not any(os.path.exists(os.path.join(folder, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        raise ModelFolderError(f"{source}: no tokenizer files (tokenizer.json); save the tokenizer into the "
                               "folder with `tokenizer.save_pretrained(DIR)`")
    hf = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    tok = HFTokenizer(hf, name=f"hf:{os.path.basename(folder.rstrip('/'))}")
    if check_model:
        info: FolderInfo = inspect_folder(folder, trust_remote_code, require_weights=False)
        check_tokenizer_fits(tok.vocab_size, info.vocab_rows, str(source))
    return tok


# Re-exported so integrators need one import for sources: names of the files a folder holds.
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX)


AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM",
                "classification": "AutoModelForSequenceClassification"}
"""raybig task -> the transformers auto class that builds its head."""


def build_head_model(source: Mapping[str, Any] | str, task: str, from_pretrained: bool, trust_remote_code: bool = False,
                     zero3_config: Mapping[str, Any] | None = None, seed: int | None = None,
                     **head_kwargs: Any) -> Any:
    """A transformers model with `task`'s head (`AUTO_CLASSES`): loaded from a folder, or random from a config.

    Args:
        source: `model.hf` (with `from_pretrained`) or `model.hf_config` (a dict, config.json or folder).
        task: causal_lm, masked_lm or classification (`AutoModelForSequenceClassification`).
        from_pretrained: load the folder's weights (a head the folder lacks, e.g. a classifier's, starts
            random, as transformers does); else random init from the config.
        trust_remote_code: allow the folder's own model code.
        zero3_config: DeepSpeed config for ZeRO-3 (`register_zero3`): parameters built partitioned.
        seed: `torch.manual_seed(seed)` before building (reproducible random parts).
        head_kwargs: config overrides, e.g. `num_labels` for a classifier.

    Raises:
        ModelFolderError, UnknownArchitectureError: a bad folder or config; ModelSourceError for
        ZeRO-3 without torch.distributed.
    """
    import torch
    import transformers

    from raybig.spec.hf_params import known_head_types

    if task == "causal_lm" and not head_kwargs:
        if from_pretrained:
            assert isinstance(source, str)
            return load_causal_lm(source, "fp32", trust_remote_code, zero3_config)
        return build_from_config(source, trust_remote_code=trust_remote_code, zero3_config=zero3_config, seed=seed)
    auto = getattr(transformers, AUTO_CLASSES[task])
    if from_pretrained:
        assert isinstance(source, str)
        folder = resolve_model_source(source, trust_remote_code)
        keep = register_zero3(zero3_config)
        if seed is not None:
            torch.manual_seed(seed)
        model = auto.from_pretrained(folder, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                     local_files_only=True, use_safetensors=True, **head_kwargs)
    else:
        if isinstance(source, str) and not os.path.exists(os.path.expanduser(source)) and (
                "://" in source or _looks_like_hub_id(source)):
            source = resolve_model_source(source, trust_remote_code, require_weights=False)
        cfg = _config_dict(source)
        where = source if isinstance(source, str) else "model.hf_config"
        known = known_head_types(task)
        if known is not None and cfg.get("model_type") not in known and not (trust_remote_code and cfg.get("auto_map")):
            raise UnknownArchitectureError(f"{where}: model type {cfg.get('model_type')!r} has no {task} head in "
                                           "the installed transformers")
        if not trust_remote_code:
            cfg.pop("auto_map", None)
        mt = cfg.pop("model_type")
        hf_cfg = transformers.AutoConfig.for_model(
            mt, **{k: v for k, v in {**cfg, **head_kwargs}.items() if k != "transformers_version"})
        keep = register_zero3(zero3_config)
        if seed is not None:
            torch.manual_seed(seed)
        model = auto.from_config(hf_cfg, trust_remote_code=trust_remote_code)
    if keep is not None:
        model._raybig_ds_config = keep
    return model
