"""The train spec and its sections. Every field carries its description; validation lives here.

The other kinds live beside it (`sweep.py`, `serve.py`, `pipeline.py`, `probe.py`); `JobSpec`, the
union of all of them, is in `raybig.spec.job`.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raybig.spec.base import MAX_BYTES, NAME_RE, Bytes, Name, QueuedSpec, Strict, at

__all__ = ["MAX_BYTES", "NAME_RE", "PRESETS", "Bytes", "CheckpointSpec", "DataSpec", "DeepSpeedSpec",
           "FinetuneSpec", "ModelSpec", "Name", "QueuedSpec", "ResourcesSpec", "SampleSpec", "StorageSpec", "Strict",
           "TrainLoopSpec", "TrainSpec", "at"]


# --- model -------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, int]] = {
    # A few hundred thousand parameters: runs the whole path in seconds on CPU.
    "gpt-debug": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
    "gpt-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "gpt-mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=512),
    "gpt2-125m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt-1.3b": dict(n_layer=24, n_head=32, n_embd=2048, block_size=2048),
}


class ModelSpec(Strict):
    """Which network to train: a GPT preset, explicit GPT shape, or a plug-in factory."""

    preset: Literal["gpt-debug", "gpt-tiny", "gpt-mini", "gpt2-125m", "gpt2-350m", "gpt-1.3b"] | None = Field(
        None, description="Named GPT shape; explicit n_layer/n_head/... override its values.")
    n_layer: int | None = Field(None, ge=1, le=256, description="Transformer blocks.")
    n_head: int | None = Field(None, ge=1, le=256, description="Attention heads per block.")
    n_embd: int | None = Field(None, ge=8, le=65536, description="Model width.")
    block_size: int | None = Field(None, ge=8, le=131072, description="Longest context the model supports.")
    vocab_size: int | None = Field(None, ge=2, le=1_000_000,
                                   description="Vocabulary size; defaults to the tokenizer's.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability.")
    bias: bool = Field(False, description="Bias terms in Linear and LayerNorm layers.")
    target: str | None = Field(None, description="Plug-in 'package.module:factory' returning an nn.Module.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for `target`.")
    hf: str | None = Field(None, min_length=1, description="A Hugging Face causal LM to fine-tune: a local "
                           "`save_pretrained` folder, an fsspec URI of one (fetched once per node), or a hub id "
                           "already in the local Hugging Face cache (never downloaded). Safetensors only.")
    hf_config: str | dict[str, Any] | None = Field(
        None, description="Build a Hugging Face architecture from its config alone (random init): a "
        "config.json, a folder holding one, or an inline mapping with `model_type`.")
    trust_remote_code: bool = Field(False, description="Allow the model folder's own Python code "
                                    "(`auto_map`); only for folders you trust.")

    @field_validator("hf")
    @classmethod
    def _hf_path(cls, v: str | None) -> str | None:
        # A relative folder is made absolute here: Ray workers do not share the driver's cwd.
        if v is None or "://" in v and not v.startswith("file://"):
            return v
        from raybig.spec.hf_params import looks_like_hub_id

        local = os.path.abspath(os.path.expanduser(v.removeprefix("file://")))
        return local if os.path.exists(local) or not looks_like_hub_id(v) else v

    @field_validator("hf_config")
    @classmethod
    def _hf_config_path(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(v, str) and "://" not in v:
            return os.path.abspath(os.path.expanduser(v))
        return v

    @property
    def is_hf(self) -> bool:
        """Whether the model is a Hugging Face one (`hf` or `hf_config`) rather than raybig's GPT."""
        return self.hf is not None or self.hf_config is not None

    @field_validator("target")
    @classmethod
    def _target_shape(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError("must look like 'package.module:factory'")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.is_hf:
            if self.hf is not None and self.hf_config is not None:
                raise at("hf_config", "give either hf (weights) or hf_config (random init), not both")
            for k in ("preset", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "target"):
                if getattr(self, k) is not None:
                    src = "hf" if self.hf is not None else "hf_config"
                    raise at(k, f"{k} does not apply to a Hugging Face model (its config.json sets the "
                             f"shape); drop it or drop model.{src}")
            if self.bias:
                raise at("bias", "bias does not apply to a Hugging Face model (its config sets it)")
            return self
        if self.target is None:
            if self.preset is None and None in (self.n_layer, self.n_head, self.n_embd):
                raise at("preset", "give a preset, or all of n_layer, n_head and n_embd, or a target")
            shape = self.gpt_shape()
            if shape["n_embd"] % shape["n_head"]:
                raise at("n_embd", f"n_embd={shape['n_embd']} must be divisible by n_head={shape['n_head']}")
        elif self.preset is not None:
            raise at("target", "give either preset or target, not both")
        elif self.kwargs and not isinstance(self.kwargs, dict):
            raise at("kwargs", "must be a mapping")
        return self

    def gpt_shape(self) -> dict[str, int]:
        """n_layer, n_head, n_embd, block_size: the preset's values with explicit keys on top."""
        shape = dict(PRESETS[self.preset]) if self.preset else {"block_size": 256}
        for k in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, k) is not None:
                shape[k] = getattr(self, k)
        return shape


DEFAULT_BPE_VOCAB = 4096
"""`data.vocab_size` when `data.tokenizer: bpe` gives none."""


# --- data --------------------------------------------------------------------------------------


class DataSpec(Strict):
    """Text corpus: any fsspec URI or glob of text files, or `stdlib://` (Python's own sources)."""

    path: str = Field("stdlib://", min_length=1, description="fsspec URI/glob of text files, or stdlib://.")
    seq_len: int = Field(128, ge=8, le=131072, description="Tokens per training sequence.")
    tokenizer: Literal["bytes", "bpe", "model"] | None = Field(
        None, description="bytes (UTF-8 bytes, vocab 256), bpe (a byte-level BPE trained on the training "
        "split at the start of the run and saved as <run>/tokenizer.json), or model (the Hugging Face "
        "model folder's own tokenizer). Default: model for `model.hf`, bytes otherwise.")
    vocab_size: int | None = Field(None, ge=257, le=1_000_000, description="BPE vocabulary size "
                                   "(tokenizer: bpe only; default 4096); the model's vocabulary follows it.")
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="Share of the corpus held out.")
    max_bytes: int = Field(16_000_000, ge=10_000, description="Read at most this many bytes of text.")

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.vocab_size is not None and self.tokenizer != "bpe":
            raise at("vocab_size", f"vocab_size sets the size of a trained BPE; it needs tokenizer: bpe "
                     f"(got tokenizer: {self.tokenizer or 'default'})")
        return self

    def bpe_vocab(self) -> int:
        """The BPE vocabulary size to train: vocab_size, or 4096 when unset."""
        return self.vocab_size or DEFAULT_BPE_VOCAB


# --- train loop --------------------------------------------------------------------------------


class TrainLoopSpec(Strict):
    """Optimisation schedule."""

    steps: int = Field(300, ge=1, le=100_000_000, description="Optimizer steps.")
    micro_batch_size: int = Field(8, ge=1, le=65536, description="Sequences per worker per micro step.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro steps per optimizer step.")
    lr: float = Field(3e-4, gt=0.0, le=10.0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine floor as a fraction of lr.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps "
                                     "(default: min(20, steps // 10)).")
    weight_decay: float = Field(0.1, ge=0.0, le=1.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0.0, description="Clip gradient norm (0 = off).")
    eval_every: int = Field(50, ge=1, description="Validation loss every N steps (and at the end).")
    eval_batches: int = Field(8, ge=1, le=10_000, description="Micro batches per validation pass.")
    log_every: int = Field(10, ge=1, description="Report training metrics every N steps.")
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainLoopSpec:
        if self.warmup_steps is not None and self.warmup_steps >= self.steps and self.steps > 1:
            raise at("warmup_steps", f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")
        return self

    @property
    def warmup(self) -> int:
        """Linear warmup in steps: warmup_steps, or min(20, steps // 10) when unset."""
        return min(20, self.steps // 10) if self.warmup_steps is None else self.warmup_steps


# --- deepspeed ---------------------------------------------------------------------------------


class DeepSpeedSpec(Strict):
    """DeepSpeed ZeRO settings."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 (DDP), 1, 2 or 3.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="Optimizer state to CPU.")
    offload_param: Literal["none", "cpu"] = Field("none", description="Parameters to CPU (ZeRO-3 only).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = fp32 on CPU; on GPU bf16 where supported natively (compute capability "
        ">= 8.0), else fp16 with dynamic loss scaling.")
    extra: dict[str, Any] = Field(default_factory=dict,
                                  description="Merged over the generated DeepSpeed config (expert use).")

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedSpec:
        if self.offload_param != "none" and self.zero_stage != 3:
            raise at("offload_param", f"offload_param={self.offload_param!r} needs zero_stage 3 "
                     f"(got zero_stage={self.zero_stage})")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise at("offload_optimizer", "offload_optimizer needs zero_stage 1, 2 or 3 (got 0)")
        return self


# --- resources / storage / checkpoint ----------------------------------------------------------


class ResourcesSpec(Strict):
    """The gang of Ray Train workers."""

    workers: int = Field(2, ge=1, le=4096, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(1.0, gt=0.0, le=1024, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(0.0, ge=0.0, le=16, description="GPUs per worker (0 = CPU training).")
    memory_per_worker: Bytes | None = Field(None, description="RAM per worker in bytes, e.g. '8GiB'; "
                                            "checked against the ZeRO memory estimate and reserved in Ray.")
    custom: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per worker.")

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus(cls, v: float) -> float:
        # Each rank drives exactly one device (DeepSpeed's engine, NCCL): a fraction would share a GPU
        # between ranks and a second GPU would sit idle, so neither is accepted.
        if v not in (0, 1):
            raise ValueError(f"must be 0 (CPU) or 1: each worker trains on one GPU (got {v}); for more "
                             "GPUs raise resources.workers")
        return v

    @field_validator("custom")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            # Built-in names would silently override cpus_per_worker etc. in the resource request.
            if name in ("CPU", "GPU", "memory", "object_store_memory") or not re.fullmatch(r"[\w.:/-]{1,128}", name):
                raise ValueError(f"{name[:40]!r} is not a custom resource name "
                                 "(CPU, GPU and memory have their own keys)")
            if not 0 <= amount <= 1e6:
                raise at(name, f"must be between 0 and 1e6 (got {amount})") if name.isidentifier() else \
                    ValueError(f"{name[:40]!r}: must be between 0 and 1e6 (got {amount})")
        return v

    def bundle(self) -> dict[str, float]:
        """One worker's Ray resource request: CPU, GPU (if any), memory in bytes (if set), custom."""
        b: dict[str, float] = {"CPU": float(self.cpus_per_worker), **{k: float(v) for k, v in self.custom.items()}}
        if self.gpus_per_worker:
            b["GPU"] = float(self.gpus_per_worker)
        if self.memory_per_worker:
            b["memory"] = float(self.memory_per_worker)
        return b


class StorageSpec(Strict):
    """Where runs write checkpoints, metrics and exports."""

    path: str = Field("./runs", min_length=1, description="Local path or fsspec URI (s3://, gs://, ...).")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if v.startswith("memory://"):
            raise ValueError("memory:// is per-process and cannot hold Ray Train storage; "
                             "use a local path or shared storage (s3://, gs://, NFS)")
        return v


class CheckpointSpec(Strict):
    """Checkpoint cadence, retention and failure handling."""

    every: int = Field(100, ge=1, description="Save a checkpoint every N steps (and at the end).")
    keep: int = Field(2, ge=1, le=1000, description="Keep the newest N checkpoints.")
    max_failures: int = Field(2, ge=-1, le=1000, description="Worker-group restarts from the last "
                              "checkpoint before the run fails (-1 = unlimited).")


class SampleSpec(Strict):
    """A short generated sample printed at the end of training."""

    prompt: str = Field("def ", description="Prompt text.")
    max_new_tokens: int = Field(120, ge=0, le=4096, description="Tokens to generate (0 = no sample).")
    temperature: float = Field(0.8, ge=0.0, le=5.0, description="Sampling temperature.")


class FinetuneSpec(Strict):
    """What training updates: every weight (full), or a LoRA adapter (Hu et al. 2021) through peft."""

    method: Literal["full", "lora"] = Field("full", description="full: train every weight; lora: train "
                                            "only low-rank adapters on `target_modules` (the rest frozen).")
    r: int = Field(8, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0.0, le=1e6, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | str | None = Field(
        None, description="Layers to adapt: names (a layer matches if its name ends with one), a regex "
        "matching whole names, or 'all-linear'. Default: c_attn (raybig's GPT, GPT-2), q_proj and "
        "v_proj (Llama family).")
    merge: bool = Field(True, description="Export the adapter merged into the weights; false writes the "
                        "adapter alone in peft's format (Hugging Face models only).")

    @model_validator(mode="after")
    def _check(self) -> FinetuneSpec:
        # `is not None`, not "was given": a dumped spec re-validated (spec.yaml, sweep trials) lists it as null.
        if self.method == "full" and self.target_modules is not None:
            raise at("target_modules", "target_modules applies to method: lora only")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise at("target_modules", "give at least one layer name (or 'all-linear')")
        return self


class TrainSpec(QueuedSpec):
    """A training job: one GPT (or plug-in) model trained with DeepSpeed ZeRO on Ray Train."""

    kind: Literal["train"] = "train"
    name: Name = Field(..., pattern=NAME_RE, description="Run name; also the run directory's name.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds init, data order and dropout.")
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(preset="gpt-tiny"))
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainLoopSpec = Field(default_factory=TrainLoopSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    init_from: str | None = Field(None, description="Fine-tune: load weights (only) from this export or "
                                  "checkpoint URI.")
    sample: SampleSpec = Field(default_factory=SampleSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        from raybig.spec.deepspeed import check_extra
        from raybig.spec.memory import check_fit

        if self.deepspeed.precision == "fp16" and self.resources.gpus_per_worker == 0:
            raise at("deepspeed.precision", "fp16 is not supported by DeepSpeed's CPU accelerator; "
                     "use fp32 or bf16 (or gpus_per_worker > 0)")
        self._check_tokenizer_and_finetune()
        if self.model.is_hf:
            self._check_hf()
        elif self.model.target is None:
            bs = self.model.gpt_shape()["block_size"]
            if self.data.seq_len > bs:
                raise at("data.seq_len", f"seq_len={self.data.seq_len} exceeds the model's block_size={bs}")
        for sub, msg in check_extra(self):
            raise at(f"deepspeed.extra.{sub}", msg)
        problem = check_fit(self)
        if problem:
            raise at("resources.memory_per_worker", problem)
        return self


    def _check_tokenizer_and_finetune(self) -> None:
        m, d, f = self.model, self.data, self.finetune
        if d.tokenizer == "model" and not m.is_hf:
            raise at("data.tokenizer", "tokenizer: model means the Hugging Face folder's own tokenizer; "
                     "it needs model.hf (raybig's GPT uses bytes or bpe)")
        if d.tokenizer == "model" and isinstance(m.hf_config, dict):
            raise at("data.tokenizer", "an inline model.hf_config has no tokenizer; use tokenizer: bpe "
                     "(or bytes), or point hf_config at a folder with tokenizer files")
        if d.tokenizer == "bpe" and m.vocab_size is not None and m.vocab_size < d.bpe_vocab():
            raise at("model.vocab_size", f"vocab_size={m.vocab_size} is below the BPE's "
                     f"data.vocab_size={d.bpe_vocab()}; drop model.vocab_size (it follows the tokenizer)")
        if f.method == "lora" and not f.merge and not m.is_hf:
            raise at("finetune.merge", "merge: false writes a peft adapter for a Hugging Face base model; "
                     "raybig's GPT always exports merged weights")

    def _check_hf(self) -> None:
        from raybig.spec import hf_params as hp

        m = self.model
        where = "model.hf" if m.hf is not None else "model.hf_config"
        try:
            info = hf_model_info(m.hf, m.hf_config, m.trust_remote_code)
        except hp.ModelSourceError as e:
            raise at(where, str(e)) from None
        cfg = info["config"]
        n_pos = cfg.get("max_position_embeddings") or cfg.get("n_positions")
        if n_pos and self.data.seq_len > int(n_pos):
            raise at("data.seq_len", f"seq_len={self.data.seq_len} exceeds the model's context "
                     f"({n_pos} positions in its config.json)")
        rows = hp.embedding_rows(cfg)
        kind = self.tokenizer_kind()
        if kind == "model":
            folder = info["folder"]
            if folder is None or not hp.has_tokenizer(folder):
                raise at("data.tokenizer", f"{m.hf or m.hf_config} has no tokenizer files (tokenizer.json); "
                         "save one there with `tokenizer.save_pretrained(DIR)`, or use tokenizer: bpe")
            n_tok = hp.tokenizer_vocab_size(folder)
        else:
            n_tok = self.data.bpe_vocab() if kind == "bpe" else 256
        if n_tok is not None and rows is not None and n_tok > rows:
            raise at(where if kind == "model" else "data.tokenizer",
                     f"the tokenizer has {n_tok} tokens but the model only {rows} embedding rows; use "
                     "the tokenizer saved with this model (or a smaller data.vocab_size)")
        if self.finetune.method == "lora":
            try:
                hp.lora_trainable_params(info["shapes"], self.finetune.r, self.lora_targets())
            except hp.ModelSourceError as e:
                raise at("finetune.target_modules", str(e)) from None

    # --- derived quantities (written once; every layer asks the spec) ---------------------------

    def tokenizer_kind(self) -> str:
        """The tokenizer kind: bytes, bpe or model.

        `data.tokenizer`, defaulting to model for `model.hf` (and an
        `hf_config` folder), bytes otherwise.
        """
        if self.data.tokenizer is not None:
            return self.data.tokenizer
        m = self.model
        return "model" if m.hf is not None or isinstance(m.hf_config, str) else "bytes"

    def lora_targets(self) -> list[str] | str:
        """LoRA `target_modules`: the spec's, else the model family's default (see hf_params)."""
        from raybig.spec.hf_params import DEFAULT_LORA_TARGETS

        if self.finetune.target_modules is not None:
            return self.finetune.target_modules
        family = "raybig"
        if self.model.is_hf:
            family = str(hf_model_info(self.model.hf, self.model.hf_config,
                                       self.model.trust_remote_code)["config"].get("model_type"))
        return list(DEFAULT_LORA_TARGETS.get(family, ("q_proj", "v_proj")))

    def model_vocab(self) -> int:
        """Vocabulary rows of raybig's GPT: model.vocab_size, else the tokenizer's (BPE: its target size)."""
        if self.model.vocab_size:
            return self.model.vocab_size
        return self.data.bpe_vocab() if self.tokenizer_kind() == "bpe" else 256


    def global_batch(self) -> int:
        """Sequences per optimizer step over all workers: micro_batch_size x grad_accum x workers."""
        return self.train.micro_batch_size * self.train.grad_accum * self.resources.workers

    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all workers: global_batch() x data.seq_len."""
        return self.global_batch() * self.data.seq_len

    def worker_bundle(self) -> dict[str, float]:
        """One worker's Ray resource request (CPU, GPU, memory in bytes, custom resources)."""
        return self.resources.bundle()


def hf_model_info(hf: str | None, hf_config: str | dict[str, Any] | None,
                  trust_remote_code: bool) -> dict[str, Any]:
    """What validation needs of a Hugging Face source, read without torch and cached per process.

    Returns:
        {"folder": local folder or URI (None for an inline config), "config": config dict,
         "shapes": {parameter name: shape} from safetensors headers (or the config for hf_config)}.

    Raises:
        raybig.spec.hf_params.ModelSourceError subclasses (one line each).
    """
    import json

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
    import json

    from raybig.spec import hf_params as hp

    if hf is not None:
        folder = hp.locate_source(hf)
        info = hp.inspect_folder(folder, trust_remote_code)
        return {"folder": folder, "config": info.config, "shapes": hp.weight_shapes(info)}
    assert hf_config is not None
    inline = hf_config.startswith("{")
    cfg = hp.config_of(json.loads(hf_config) if inline else hf_config, trust_remote_code)
    where = None if inline else (hf_config if os.path.isdir(hf_config) else os.path.dirname(hf_config))
    return {"folder": where, "config": cfg, "shapes": hp.config_shapes(cfg)}
