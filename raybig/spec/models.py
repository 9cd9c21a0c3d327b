"""The train spec and its sections. Every field carries its description; validation lives here.

The other kinds live beside it (`sweep.py`, `serve.py`, `pipeline.py`, `probe.py`); `JobSpec`, the
union of all of them, is in `raybig.spec.job`.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raybig.spec.base import MAX_BYTES, NAME_RE, Bytes, Name, QueuedSpec, Strict, at, local_abs
from raybig.spec.hf_params import hf_model_info

__all__ = ["MAX_BYTES", "NAME_RE", "PRESETS", "Bytes", "CheckpointSpec", "ClassifierSpec", "DataSpec",
           "DeepSpeedSpec", "EvalSpec", "MlflowSpec", "TrackingSpec",
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
        return local_abs(v) if isinstance(v, str) else v

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


DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
"""`data.prompt_template` of instruction data when none is given (Alpaca's layout)."""

_RECORD_EXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def _ext_format(path: str) -> str | None:
    """`jsonl`/`parquet`/`text` from a path's extension; None when it names no extension (a folder)."""
    if path.startswith("stdlib://"):
        return "text"
    base = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for ext, fmt in _RECORD_EXT.items():
        if base.endswith(ext):
            return fmt
    return "text" if "." in base.lstrip(".") else None


def _template_fields(template: str) -> list[str]:
    import string

    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"is not a format template ({e}); write fields as {{name}} and a literal brace "
                         "as {{ or }}") from None
    for _, fld, _, _ in parsed:
        if fld is None:
            continue
        name = fld.split(".")[0].split("[")[0]
        if not name or name.isdigit():
            raise ValueError("has a positional field ({} or {0}); name every field after a record field, "
                             "e.g. {prompt}")
        if name not in names:
            names.append(name)
    return names


def _first_local_file(path: str) -> str | None:
    """The first (sorted) non-empty local file a data path names, or None (remote, nothing, unreadable)."""
    import glob

    p = path.removeprefix("file://")
    if "://" in p:
        return None
    p = os.path.expanduser(p)
    if os.path.isdir(p):
        for root, dirs, names in os.walk(p):
            dirs.sort()
            for n in sorted(names):
                f = os.path.join(root, n)
                if os.path.getsize(f):
                    return f
        return None
    files = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p]
    return next((f for f in files if os.path.isfile(f) and os.path.getsize(f)), None)


def _first_record(file: str, fmt: str) -> tuple[int, dict[str, Any]] | None:
    """(line, record) of the first record of a local jsonl/parquet file; None if not an object."""
    import json

    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(file)
        if pf.metadata.num_rows == 0:
            return None
        rows = pf.read_row_group(0).slice(0, 1).to_pylist()
        return (1, rows[0]) if rows else None
    with open(file, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            if i > 1000:
                return None
            if raw.strip():
                try:
                    v = json.loads(raw)
                except ValueError:
                    return None  # a malformed line is a bad record: prepare reports or skips it
                return (i, v) if isinstance(v, dict) else None
    return None


class DataSpec(Strict):
    """Training data: text files, or jsonl/parquet records (text, instruction or chat examples).

    Any path, glob, folder or fsspec URI (`s3://`, `gs://`), a list of them, or `stdlib://`
    (Python's own sources). It is tokenized once into token shards (`raybig prepare`, or
    automatically by `raybig run`) and each worker streams its own share of them.

    What an example is follows from the fields given: `messages_field` (chat: a list of
    `{role, content}` rendered with the tokenizer's chat template, loss on assistant turns),
    `response_field` or `prompt_template` (instruction: the template filled from the record, then
    the response; loss on the response only), else text (`text_field` of each record, or whole
    text files; loss on every token).
    """

    path: str | list[str] = Field(
        "stdlib://", description="Path, glob, folder or fsspec URI (s3://, gs://) of the data, a list of "
        "them, or stdlib:// (Python's own sources).")
    format: Literal["text", "jsonl", "parquet"] | None = Field(
        None, description="How files are read: text (whole files), jsonl (one JSON object a line) or parquet. "
        "Default: by each file's extension (.jsonl/.ndjson/.json, .parquet/.pq, else text).")
    text_field: str | None = Field(
        None, min_length=1, description="Record field holding the text (jsonl/parquet text data; default 'text').")
    prompt_template: str | None = Field(
        None, min_length=1, description="Instruction data: the prompt as a str.format template over record "
        "fields, e.g. '### Instruction:\\n{prompt}\\n\\n### Response:\\n' (the default).")
    response_field: str | None = Field(
        None, min_length=1, description="Instruction data: the record field holding the response "
        "(default 'response' when prompt_template is given). The loss is taken on it alone.")
    messages_field: str | None = Field(
        None, min_length=1, description="Chat data: the record field holding [{role, content}, ...]; the loss "
        "is taken on assistant turns.")
    seq_len: int = Field(128, ge=8, le=131072, description="Tokens per training sequence.")
    tokenizer: Literal["bytes", "bpe", "model"] | None = Field(
        None, description="bytes (UTF-8 bytes, vocab 256), bpe (a byte-level BPE trained on the training "
        "split at the start of the run and saved as <run>/tokenizer.json), or model (the Hugging Face "
        "model folder's own tokenizer). Default: model for `model.hf`, bytes otherwise.")
    vocab_size: int | None = Field(None, ge=257, le=1_000_000, description="BPE vocabulary size "
                                   "(tokenizer: bpe only; default 4096); the model's vocabulary follows it.")
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Share of documents held out for validation, "
                                "chosen by a seeded hash of each document (0: no validation split, no val_loss).")
    split_seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds the document-level train/validation split.")
    max_tokens: int | None = Field(None, ge=1, description="Use at most this many tokens of the corpus (whole "
                                   "documents, in file order); default: all of it. The prepare summary says "
                                   "how much of the corpus was used.")
    max_bytes: int | None = Field(None, ge=10_000, description="Deprecated: use max_tokens (the limit now counts "
                                  "tokens; with the bytes tokenizer one byte is one token).")
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail", description="A malformed record (not JSON, a missing or non-string field): fail names its "
        "file:line; skip counts it (the prepare summary lists the count and the first ones).")
    shard_tokens: int = Field(1 << 26, ge=1024, le=1 << 40, description="Tokens per prepared shard file "
                              "(a shard closes at the first document boundary past it).")
    prepared_path: str | None = Field(None, min_length=1, description="Where prepared token shards go (any "
                                      "fsspec URI); default <storage.path>/.prepared. One folder per "
                                      "fingerprint of sources, tokenizer and options, reused while they match.")
    packed: bool | None = Field(None, description="Pack whole examples into each seq_len row, each attending "
                                "only within itself (raybig's GPT; see README for Hugging Face models). "
                                "Default: true for instruction and chat data, false for text (random windows).")
    target: str | None = Field(None, pattern=r"^[\w.]+:\w+$", description="task: custom: a plug-in dataset "
                               "'package.module:factory' returning a map-style dataset of examples (see README, "
                               "Plug-ins); the other data fields are then unused.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for `data.target`.")

    @field_validator("path")
    @classmethod
    def _paths(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("give at least one path")
        if any(not p for p in items):
            raise ValueError("a path must not be empty")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None and not _template_fields(v):
            raise ValueError("names no record field; write the prompt's field as {name}, e.g. {prompt}")
        return v

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.vocab_size is not None and self.tokenizer != "bpe":
            raise at("vocab_size", f"vocab_size sets the size of a trained BPE; it needs tokenizer: bpe "
                     f"(got tokenizer: {self.tokenizer or 'default'})")
        if self.max_bytes is not None and self.max_tokens is not None:
            raise at("max_bytes", "max_bytes is the deprecated name of max_tokens; give only max_tokens")
        inst = [k for k in ("prompt_template", "response_field") if getattr(self, k) is not None]
        if self.messages_field is not None and inst:
            raise at(inst[0], f"{inst[0]} is for instruction data, messages_field for chat data; give one kind")
        given = [k for k in ("messages_field", *inst) if getattr(self, k) is not None]
        if self.text_field is not None and given:
            raise at("text_field", f"text_field is for text records; {given[0]} makes these "
                     f"{self.example_format()} examples: drop one")
        record_fields = [k for k in ("text_field", *given) if getattr(self, k) is not None]
        fmt = self.file_format()
        if record_fields and fmt == "text":
            how = "data.format is text" if self.format == "text" else \
                f"data.path {self._paths_list()[0]!r} is read as text files"
            raise at(record_fields[0], f"{record_fields[0]} names a field of jsonl or parquet records, but "
                     f"{how} (set data.format: jsonl or parquet)")
        if fmt in ("jsonl", "parquet"):
            self._check_first_record(fmt)
        return self

    def _check_first_record(self, fmt: str) -> None:
        """The first record of the first local file has the fields this spec reads (cheap; remote skipped)."""
        try:
            file = _first_local_file(self._paths_list()[0])
            first = _first_record(file, fmt) if file else None
        except Exception:  # noqa: BLE001 - unreadable here: prepare reads it and reports it precisely
            return
        if first is None:
            return
        line, rec = first
        kind = self.example_format()
        needs: list[tuple[str, str]] = []  # (spec key, record field)
        if kind == "text":
            needs = [("text_field", self.text_field or "text")]
        elif kind == "chat":
            needs = [("messages_field", self.messages_field or "messages")]
        else:
            needs = [("prompt_template", f) for f in _template_fields(self.instruction_template())]
            needs.append(("response_field", self.response_field or "response"))
        for key, fld in needs:
            if fld not in rec:
                what = f"needs field {fld!r}" if key == "prompt_template" else f"names field {fld!r}"
                raise at(key, f"{what}, which the data lacks ({file}:{line} has fields "
                         f"{sorted(rec)[:10]})")

    def _paths_list(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    def file_format(self) -> str | None:
        """`format`, else the one format every path's extension implies; None when it varies per file."""
        if self.format is not None:
            return self.format
        found = {_ext_format(p) for p in self._paths_list()}
        return found.pop() if len(found) == 1 else None

    def example_format(self) -> Literal["text", "instruction", "chat"]:
        """What an example is: chat (messages_field), instruction (prompt_template/response_field), else text."""
        if self.messages_field is not None:
            return "chat"
        if self.prompt_template is not None or self.response_field is not None:
            return "instruction"
        return "text"

    def instruction_template(self) -> str:
        """The prompt template of instruction data: prompt_template, else the Alpaca-style default."""
        return self.prompt_template or DEFAULT_PROMPT_TEMPLATE

    def token_limit(self) -> int | None:
        """Tokens of the corpus to use: max_tokens, else the deprecated max_bytes, else None (all)."""
        return self.max_tokens if self.max_tokens is not None else self.max_bytes

    def is_packed(self) -> bool:
        """Whether rows pack whole examples: `packed`, else True for instruction and chat data."""
        return self.packed if self.packed is not None else self.example_format() != "text"

    def deprecations(self) -> list[str]:
        """One line per deprecated field in use (validate and run print them as warnings)."""
        if self.max_bytes is None:
            return []
        return [f"data.max_bytes is deprecated: write data.max_tokens: {self.max_bytes} (the limit now counts "
                "tokens, whole documents; with the bytes tokenizer one byte is one token)"]

    def bpe_vocab(self) -> int:
        """The BPE vocabulary size to train: vocab_size, or 4096 when unset."""
        return self.vocab_size or DEFAULT_BPE_VOCAB


# --- train loop --------------------------------------------------------------------------------


class ScheduleFrom(Strict):
    """Where a resumed run's learning-rate schedule continues from (set by raybig; see `TrainLoopSpec`)."""

    step: int = Field(..., ge=1, description="The step the run resumed at.")
    ratio: float = Field(..., ge=0.0, le=1.0, description="The schedule's lr ratio there (of `lr`).")


class TrainLoopSpec(Strict):
    """Optimisation schedule."""

    steps: int = Field(300, ge=1, le=100_000_000, description="Optimizer steps.")
    micro_batch_size: int = Field(8, ge=1, le=65536, description="Sequences per worker per micro step.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro steps per optimizer step (derived from "
                            "global_batch_size when that is set).")
    global_batch_size: int | None = Field(
        None, ge=1, le=2**31 - 1, description="Sequences per optimizer step over all workers, kept whatever "
        "the worker count: grad_accum becomes global_batch_size / (micro_batch_size x resources.workers), which "
        "must divide evenly (a given grad_accum is replaced). None: grad_accum as given, so the global batch "
        "follows the worker count.")
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
    schedule_from: ScheduleFrom | None = Field(
        None, description="Continue the learning rate from `ratio` x lr at `step` along a cosine to "
        "min_lr_ratio by `steps`, instead of warmup + cosine from step 0. raybig sets it when a resumed "
        "run's `steps` changed (raybig.train.compat), so the rate goes on from where it was.")

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

    workers: int = Field(2, ge=1, le=4096, description="Ray Train workers (data-parallel ranks). An int, or a "
                         "range `{min: a, max: b}`: then `workers` is the max (what `raybig run` starts) and "
                         "`min_workers` the min; the queue may start the job at any size in between, and a "
                         "resume at another size converts its ZeRO checkpoint (raybig.train.universal).")
    min_workers: int | None = Field(None, ge=1, le=4096, description="The fewest workers the job may run on "
                                    "(set by a `workers: {min, max}` range; None: exactly `workers`).")
    cpus_per_worker: float = Field(1.0, gt=0.0, le=1024, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(0.0, ge=0.0, le=16, description="GPUs per worker (0 = CPU training).")
    memory_per_worker: Bytes | None = Field(None, description="RAM per worker in bytes, e.g. '8GiB'; "
                                            "checked against the ZeRO memory estimate and reserved in Ray.")
    custom: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per worker.")

    @model_validator(mode="before")
    @classmethod
    def _workers_range(cls, data: Any) -> Any:
        # `workers: {min: a, max: b}` -> workers=b, min_workers=a (what every later layer reads).
        if not isinstance(data, dict) or not isinstance(data.get("workers"), dict):
            return data
        from raybig.spec.issues import did_you_mean

        rng = data["workers"]
        for k in rng:
            if k not in ("min", "max"):
                hint = did_you_mean(str(k), ["min", "max"])
                raise at(f"workers.{k}", f"unknown key {str(k)[:40]!r}{hint} (a worker range has min and max)")
        for k in ("min", "max"):
            v = rng.get(k)
            if v is None:
                raise at(f"workers.{k}", "required key is missing (a worker range is {min: a, max: b})")
            if isinstance(v, bool) or not isinstance(v, int):
                raise at(f"workers.{k}", f"must be a whole number of workers (got {str(v)[:40]!r})")
            if not 1 <= v <= 4096:
                raise at(f"workers.{k}", f"must be between 1 and 4096 (got {v})")
        if rng["min"] > rng["max"]:
            raise at("workers", f"min={rng['min']} exceeds max={rng['max']}")
        if data.get("min_workers") is not None:
            raise at("min_workers", "set either a workers range {min, max} or min_workers, not both")
        return {**data, "workers": rng["max"], "min_workers": rng["min"]}

    @model_validator(mode="after")
    def _min_le_max(self) -> ResourcesSpec:
        if self.min_workers is not None and self.min_workers > self.workers:
            raise at("min_workers", f"min_workers={self.min_workers} exceeds workers={self.workers}")
        return self

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


# --- evaluation, tracking, tasks (issue 17) ----------------------------------------------------


class EvalSpec(Strict):
    """What `raybig eval` measures, and what a train run measures once it has finished."""

    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks run offline on the export: "
                             "shipped task names (`raybig_arith_mc`, `raybig_stdlib_docs`) or paths to "
                             "lm-eval task YAMLs with local data files.")
    perplexity: bool = Field(True, description="Perplexity and bits per byte on the held-out split "
                             "(the very batches `val_loss` is computed on).")
    at_end: bool = Field(True, description="Run this evaluation when training finishes (results in "
                         "<run>/eval.json); false: only `raybig eval` runs it.")
    batch_size: int = Field(8, ge=1, le=4096, description="lm-eval requests per forward pass.")
    limit: int | None = Field(None, ge=1, description="At most this many documents per lm-eval task.")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        from raybig.errors import EvalTaskError
        from raybig.spec.eval_tasks import is_task_path, load_task_config

        out = []
        for i, task in enumerate(v):
            # A task file's relative path is the working directory's, as every path in a spec.
            name = os.path.abspath(os.path.expanduser(task)) if is_task_path(task) else task
            try:
                load_task_config(name)
            except EvalTaskError as e:
                raise at(str(i), str(e)) from None
            out.append(name)
        if len(set(out)) != len(out):
            raise ValueError("a task is listed twice")
        return out


TRACKING_SCHEMES = ("file", "sqlite", "http", "https", "databricks")
"""MLflow tracking URI schemes raybig accepts (a plain path means a local file store)."""


class MlflowSpec(Strict):
    """An MLflow tracking store: a local file store (no server), a SQLite file, or a tracking server."""

    tracking_uri: str = Field(..., min_length=1, description="file:///abs/dir (or a plain path), "
                              "sqlite:///abs/mlflow.db, or http(s)://host:port of an `mlflow server`.")
    experiment: str = Field("raybig", min_length=1, max_length=500,
                            description="Experiment name (created if missing).")
    log_export: bool = Field(True, description="Upload the export folder as the run's `export` artifacts.")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        from urllib.parse import urlparse

        scheme = urlparse(v).scheme
        if scheme == "":  # a plain path: the local file store there, made absolute now (workers' cwd differs)
            from pathlib import Path

            return Path(os.path.abspath(os.path.expanduser(v))).as_uri()
        if scheme == "file" and not v.startswith("file:///"):
            raise ValueError(f"{v!r}: a file store URI is file:///absolute/dir (three slashes)")
        if scheme.split("+")[0] not in TRACKING_SCHEMES:
            raise ValueError(f"{v!r}: unsupported scheme {scheme!r} (use file:///dir, sqlite:///file.db or "
                             "http(s)://host:port)")
        return v


class TrackingSpec(Strict):
    """Experiment tracking: parameters (the resolved spec, secrets as ${VAR}), metrics and the export."""

    mlflow: MlflowSpec | None = Field(None, description="Log to MLflow from rank 0's reports; a store "
                                      "that goes away mid-run turns tracking off, never the training.")


class ClassifierSpec(Strict):
    """A built-in classifier on labelled arrays (`task: classification`)."""

    arch: Literal["mlp", "cnn"] = Field("mlp", description="mlp (flatten, hidden layers) or cnn (two 3x3 "
                                        "conv layers, max-pool, an MLP head).")
    hidden: list[int] = Field(default_factory=lambda: [128, 64], description="Hidden layer widths (mlp); "
                              "the head's hidden width is the first (cnn).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout after hidden layers (mlp).")
    dataset: str = Field("digits", min_length=1, description="digits (scikit-learn's 8x8 digits, shipped, "
                         "offline), an .npz (any fsspec URI) with x_train, y_train, x_val, y_val, or x, y, or a "
                         ".parquet with a list column `x`, an integer column `label_field` and optionally a "
                         "`split` column (train/val).")
    input_shape: list[int] | None = Field(None, description="Shape of one example (no batch dim), e.g. "
                                          "[8, 8] or [1, 28, 28]; default: the arrays' own. Flat rows "
                                          "(parquet lists) are reshaped to it; the cnn needs 2 or 3 dims.")
    label_field: str = Field("label", min_length=1, description="The label column (parquet) or field "
                             "(jsonl, Hugging Face sequence classifier).")
    val_fraction: float = Field(0.2, gt=0.0, lt=0.9, description="Held out when the dataset has no "
                                "validation arrays (stratified, seeded by `seed`).")
    num_classes: int | None = Field(None, ge=2, le=1_000_000, description="Classes; default: max label + 1.")

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v: list[int]) -> list[int]:
        if not v or any(h < 1 or h > 1_000_000 for h in v):
            raise ValueError("give at least one width, each between 1 and 1e6")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if v == "digits":
            return v
        if not v.endswith((".npz", ".parquet")):
            raise ValueError(f"{v!r}: use digits, an .npz file (x_train, y_train, x_val, y_val, or x, y) or "
                             "a .parquet file (x, label)")
        return local_abs(v)

    @model_validator(mode="after")
    def _shape(self) -> ClassifierSpec:
        s = self.input_shape
        if s is not None and (not s or any(d < 1 for d in s)):
            raise at("input_shape", "give each dimension as a positive integer")
        if self.arch == "cnn" and s is not None and len(s) not in (2, 3):
            raise at("input_shape", f"the cnn takes (H, W) or (C, H, W) images, not shape {s}")
        if self.arch == "cnn" and s is not None and min(s[-2:]) < 2:
            raise at("input_shape", f"the cnn's 2x2 max-pool needs images of at least 2x2, not {s}")
        problem = check_array_file(self) if self.dataset != "digits" and "://" not in self.dataset else None
        if problem:
            raise at(problem[0], problem[1])
        return self


def check_array_file(c: ClassifierSpec) -> tuple[str, str] | None:
    """(field, message) if a local array file cannot feed `c`'s model: shapes or labels; else None.

    Reads .npz headers and label arrays only (numpy, no torch), parquet's schema and label column.
    A missing file is left to run time (it may be written before the job starts).
    """
    import numpy as np

    if not os.path.exists(c.dataset):
        return None
    try:
        if c.dataset.endswith(".npz"):
            with np.load(c.dataset, allow_pickle=False) as z:
                names = set(z.files)
                xs = [k for k in ("x_train", "x_val", "x") if k in names]
                ys = [k for k in ("y_train", "y_val", "y") if k in names]
                if not xs or not ys:
                    return "dataset", f"{c.dataset} must hold x_train, y_train, x_val, y_val (or x, y); it holds {sorted(names)}"
                shapes = {k: tuple(z[k].shape[1:]) for k in xs}
                labels = [z[k] for k in ys]
        else:
            import pyarrow.parquet as pq

            t = pq.read_table(c.dataset, columns=None)
            if "x" not in t.column_names or c.label_field not in t.column_names:
                return "dataset", (f"{c.dataset} needs columns x and {c.label_field!r} (label_field); it has "
                                   f"{t.column_names}")
            first = t.column("x")[0].as_py() if t.num_rows else []
            shapes = {"x": tuple(np.asarray(first).shape)}
            labels = [t.column(c.label_field).to_numpy()]
    except (OSError, ValueError, KeyError) as e:
        return "dataset", f"{c.dataset}: cannot read it: {e}"
    for k, shape in shapes.items():
        if c.input_shape is not None and int(np.prod(shape)) != int(np.prod(c.input_shape)):
            return "input_shape", f"{k} in {c.dataset} has examples of shape {list(shape)}, not {c.input_shape}"
        if c.arch == "cnn" and c.input_shape is None and len(shape) not in (2, 3):
            return "arch", (f"the cnn takes (H, W) or (C, H, W) images but {k} has examples of shape "
                            f"{list(shape)}; set classifier.input_shape")
    for y in labels:
        if y.size and not np.issubdtype(y.dtype, np.integer):
            return "dataset", f"{c.dataset}: labels must be integers, not {y.dtype}"
        if y.size and c.num_classes is not None and (y.min() < 0 or y.max() >= c.num_classes):
            return "num_classes", (f"labels in {c.dataset} lie in [{y.min()}, {y.max()}], outside "
                                   f"[0, {c.num_classes})")
        if y.size and y.min() < 0:
            return "dataset", f"labels in {c.dataset} must be >= 0, found {y.min()}"
    return None


class MaskedLMSpec(Strict):
    """BERT masking for `task: masked_lm` (Devlin et al. 2019, section 3.1)."""

    probability: float = Field(0.15, gt=0.0, lt=1.0, description="Fraction of (non-special) tokens chosen "
                               "for prediction; of those 80% become [MASK], 10% a random token, 10% stay.")


class DistillSpec(Strict):
    """Knowledge distillation (Hinton et al. 2015): the loss mixes the data loss and the teacher's soft targets."""

    teacher: str = Field(..., min_length=1, description="The teacher: an export dir or a run dir (any "
                         "fsspec URI); same vocabulary (or classes) as the student.")
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="Softmax temperature T of both models' "
                               "logits in the KL term (the term is scaled by T^2).")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Loss = (1 - alpha) * data loss + alpha * T^2 * "
                         "KL(teacher_T || student_T).")

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str) -> str:
        return local_abs(v)


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
    task: Literal["causal_lm", "masked_lm", "classification", "custom"] = Field(
        "causal_lm", description="What training optimises: causal_lm (next-token prediction), masked_lm "
        "(BERT masking of a Hugging Face encoder; masked_accuracy beside the loss) or classification (a "
        "built-in `classifier` on labelled arrays, or a Hugging Face sequence classifier on text+label "
        "jsonl; accuracy beside the loss) or custom (a plug-in model's forward(batch) on a plug-in dataset, "
        "data.target; its own loss and named metrics).")
    classifier: ClassifierSpec | None = Field(None, description="The classifier and its data "
                                              "(task: classification; default: an MLP on digits).")
    masked_lm: MaskedLMSpec | None = Field(None, description="Masking options (task: masked_lm).")
    distill: DistillSpec | None = Field(None, description="Distil from a teacher export (any task).")
    eval: EvalSpec | None = Field(None, description="Evaluation at the end of training and for `raybig eval`.")
    tracking: TrackingSpec | None = Field(None, description="Experiment tracking (MLflow).")

    @model_validator(mode="after")
    def _check_custom(self) -> TrainSpec:
        # task: custom is a plug-in model on a plug-in dataset (raybig.train.plugin_task); each needs the other.
        if self.data.target is not None and self.task != "custom":
            raise at("task", f"data.target (a plug-in dataset) trains with task: custom, not {self.task}")
        if self.task == "custom" and (self.data.target is None or self.model.target is None):
            missing = "data.target" if self.data.target is None else "model.target"
            raise at(missing, "task: custom needs a plug-in model (model.target) and a plug-in dataset "
                     "(data.target), each 'package.module:factory'")
        return self

    @model_validator(mode="before")
    @classmethod
    def _derive_grad_accum(cls, data: Any) -> Any:
        # train.global_batch_size: grad_accum follows the worker count, so `--set resources.workers=n`
        # (the queue's elastic start) and a resume on fewer workers keep the global batch.
        if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
            return data
        t = data["train"]
        gbs = t.get("global_batch_size")
        res = data["resources"] if isinstance(data.get("resources"), dict) else {}
        w = res.get("workers", ResourcesSpec.model_fields["workers"].default)
        if isinstance(w, dict):
            w = w.get("max")
        mb = t.get("micro_batch_size", TrainLoopSpec.model_fields["micro_batch_size"].default)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (gbs, w, mb)):
            return data  # unset, or a bad value its own field reports
        per = mb * w
        if gbs % per or gbs // per > 4096:
            return data  # _check_global_batch says why, once every field is valid
        return {**data, "train": {**t, "grad_accum": gbs // per}}

    @model_validator(mode="after")
    def _check_global_batch(self) -> TrainSpec:
        gbs = self.train.global_batch_size
        if gbs is None:
            return self
        mb, w = self.train.micro_batch_size, self.resources.workers
        per = mb * w
        if gbs % per:
            raise at("train.global_batch_size", f"global_batch_size={gbs} is not a multiple of micro_batch_size "
                     f"x workers = {mb} x {w} = {per}; use a multiple of {per} (e.g. {max(1, gbs // per) * per}) "
                     f"or another micro_batch_size")
        if gbs // per > 4096:
            raise at("train.global_batch_size", f"global_batch_size={gbs} needs grad_accum={gbs // per} "
                     f"(at most 4096) with micro_batch_size={mb} x workers={w}; raise micro_batch_size")
        lo = self.resources.min_workers or w
        # The queue may start a range at any size in it: each must split the global batch evenly.
        if gbs % mb == 0 and (bad := [n for n in range(lo, w + 1) if (gbs // mb) % n]):
            lcm = functools.reduce(math.lcm, range(lo, w + 1), 1) * mb
            raise at("train.global_batch_size", f"global_batch_size={gbs} does not split evenly over "
                     f"{', '.join(map(str, bad[:6]))} workers of micro_batch_size={mb}, sizes the worker range "
                     f"{lo}..{w} allows; use a multiple of {lcm}, or narrow resources.workers")
        if gbs != self.global_batch():  # a model_copy that skipped the derivation
            raise at("train.global_batch_size", f"global_batch_size={gbs} != micro_batch_size x grad_accum x "
                     f"workers = {self.global_batch()}")
        return self

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        from raybig.spec.deepspeed import check_extra
        from raybig.spec.memory import check_fit

        if self.deepspeed.precision == "fp16" and self.resources.gpus_per_worker == 0:
            raise at("deepspeed.precision", "fp16 is not supported by DeepSpeed's CPU accelerator; "
                     "use fp32 or bf16 (or gpus_per_worker > 0)")
        self._check_tokenizer_and_finetune()
        if self.masked_lm is not None and self.task != "masked_lm":
            raise at("masked_lm", f"masked_lm applies to task: masked_lm (this spec's task is {self.task})")
        if self.task == "classification":
            self._check_classification()
        elif self.classifier is not None:
            raise at("classifier", "classifier applies to task: classification (this spec's task is "
                     f"{self.task})")
        if self.task == "masked_lm" and not self.model.is_hf:
            raise at("model", "task: masked_lm trains a Hugging Face encoder: give model.hf or "
                     "model.hf_config (e.g. a BERT config)")
        if self.task == "masked_lm" and self.finetune.method != "full":
            raise at("finetune.method", "LoRA applies to causal LMs; a masked-LM encoder trains in full")
        if self.task != "causal_lm" and self.model.is_hf and self.data.is_packed():
            raise at("data", f"task: {self.task} reads plain text (or text+label); drop the instruction "
                     "fields (prompt_template, response_field, messages_field)")
        if self.task == "classification":
            pass  # checked above (a Hugging Face classifier by _check_hf too)
        elif self.model.is_hf:
            self._check_hf()
        elif self.model.target is None:
            bs = self.model.gpt_shape()["block_size"]
            if self.data.seq_len > bs:
                raise at("data.seq_len", f"seq_len={self.data.seq_len} exceeds the model's block_size={bs}")
        for sub, msg in check_extra(self):
            raise at(f"deepspeed.extra.{sub}", msg)
        # The ZeRO memory estimate models the GPT / Hugging Face model; a built-in classifier is tiny.
        problem = check_fit(self) if self.task == "causal_lm" else None
        if problem:
            raise at("resources.memory_per_worker", problem)
        if self.distill is not None:
            from raybig.spec.distill import check_teacher

            for sub, msg in check_teacher(self):
                raise at(f"distill.{sub}", msg)
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

    def _check_classification(self) -> None:
        # (A dumped spec lists the default model; only a model someone described is refused.)
        if self.model.is_hf:  # a Hugging Face sequence classifier on text+label records
            self._check_hf()
            c = self.classifier
            if c is not None and (c.dataset != "digits" or "arch" in c.model_fields_set):
                raise at("classifier", "a Hugging Face sequence classifier reads text+label records from "
                         "`data:` (data.path, data.text_field, classifier.label_field); drop "
                         "classifier.dataset and classifier.arch")
        elif "model" in self.model_fields_set and self.model != ModelSpec(preset="gpt-tiny"):
            raise at("model", "task: classification trains a built-in classifier; describe it under "
                     "`classifier:` (arch, hidden) and drop `model:`, or give model.hf / model.hf_config "
                     "for a Hugging Face sequence classifier")
        if self.finetune.method != "full":
            raise at("finetune.method", "LoRA applies to causal LMs; a classifier trains in full")
        if self.init_from is not None:
            raise at("init_from", "init_from is not supported for task: classification yet")
        if self.eval is not None and self.eval.tasks:
            raise at("eval.tasks", "lm-eval tasks score a causal LM; a classifier's accuracy is its "
                     "`val_accuracy` (drop eval.tasks)")

    def _check_hf(self) -> None:
        from raybig.spec import hf_params as hp

        m = self.model
        where = "model.hf" if m.hf is not None else "model.hf_config"
        try:
            info = hf_model_info(m.hf, m.hf_config, m.trust_remote_code)
        except hp.ModelSourceError as e:
            raise at(where, str(e)) from None
        cfg = info["config"]
        heads = hp.known_head_types(self.task)
        if self.task != "causal_lm" and heads is not None and cfg.get("model_type") not in heads:
            head = {"masked_lm": "masked-LM", "classification": "sequence-classification"}[self.task]
            raise at(where, f"model type {cfg.get('model_type')!r} has no {head} head in transformers "
                     f"(task: {self.task}); use an encoder such as bert, roberta or distilbert")
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
        if self.task == "masked_lm":
            has_mask = kind == "model" and info["folder"] is not None and hp.mask_token_id(info["folder"]) is not None
            if not has_mask and n_tok is not None and rows is not None and rows <= n_tok:
                raise at(where, f"masked_lm needs a [MASK] id: the tokenizer has no mask token, so raybig "
                         f"uses id {n_tok} (one past the tokenizer's), but the model has only {rows} "
                         f"embedding rows; set vocab_size >= {n_tok + 1} in the config")
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
