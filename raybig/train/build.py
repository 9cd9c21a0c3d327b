"""Build the network a spec names: the GPT, a Hugging Face model, or a user's plug-in factory.

Also the run's tokenizer (`run_tokenizer`) and the LoRA wrapping (`apply_lora`), so that the loop
only sees `Built`: a module for DeepSpeed plus how to get its loss.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from raybig.model import GPT, GPTConfig
from raybig.tokenizer import BYTE_VOCAB

if TYPE_CHECKING:
    from raybig.spec.models import TrainSpec


def gpt_config(spec: TrainSpec, vocab_size: int | None = None) -> GPTConfig:
    """The `GPTConfig` of the built-in GPT that `spec.model` describes.

    Args:
        spec: the train spec.
        vocab_size: the run's tokenizer's vocabulary (a trained BPE may come out smaller than
            `data.vocab_size`); `model.vocab_size` wins when set. Default: `spec.model_vocab()`.
    """
    m = spec.model
    vocab = m.vocab_size or vocab_size or spec.model_vocab() or BYTE_VOCAB
    return GPTConfig(**m.gpt_shape(), vocab_size=vocab, dropout=m.dropout,
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
    for k, v in (("vocab_size", spec.model.vocab_size or BYTE_VOCAB), ("seq_len", spec.data.seq_len)):
        if k in params and k not in kwargs:
            kwargs[k] = v
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.target {spec.model.target!r} returned {type(model).__name__}, "
                        "not a torch.nn.Module")
    return model


# --------------------------------------------------------------------------- any model, LoRA, loss


@dataclass
class Built:
    """What the loop trains.

    Attributes:
        model: the module DeepSpeed wraps (a peft model for LoRA).
        kind: "gpt" (raybig's), "hf" (transformers), "plugin", or "classifier" (`task: classification`).
        lora: whether only a LoRA adapter is trainable.
        keep: objects that must live as long as the model (transformers' ZeRO-3 config registration).
        config: the export's model config when the spec alone does not give it (a classifier's).
        task: the task strategy (`raybig.train.tasks`) that turns logits into the loss and metrics:
            a classifier's, a masked LM's, a distillation; None: the model's own loss.
        metrics: named metrics of the last `loss` call beyond the loss (a classifier's `accuracy`).
        val: the same, averaged over the last `loop.evaluate` (`val_` prefixed by `val_metrics`).
        pad_id: ids equal to it are padding (attention_mask 0) for a Hugging Face classifier.
        wrap_batches: `(batches, rank) -> batches` applied to the token-shard stream (masked LM's masking).
        eval_task: the task validation scores with (distillation: the student's own data loss).
    """

    model: nn.Module
    kind: str
    lora: bool = False
    keep: Any = None
    config: dict[str, Any] | None = None
    task: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    pad_id: int | None = None
    wrap_batches: Any = None
    eval_task: Any = None

    def val_metrics(self) -> dict[str, float]:
        """The last evaluation's extra metrics as `val_<name>` (empty for causal LMs)."""
        return {f"val_{k}": v for k, v in self.val.items()}

    def loss(self, engine: Any, x: torch.Tensor, y: torch.Tensor, positions: torch.Tensor | None = None,
             doc_ids: torch.Tensor | None = None, validation: bool = False) -> torch.Tensor:
        """Mean next-token cross-entropy, a float32 scalar on the device.

        `x` (B, T) int64 token ids, `y` (B, T) int64 targets, `y[:, t]` the token after `x[:, t]`;
        -100 (`raybig.data.shards.IGNORE_INDEX`) where no loss is taken (prompts, padding).

        transformers shifts `labels` by one itself; `shift_labels=y` hands it the already shifted
        targets, so every one of the T positions is scored, exactly as raybig's GPT does.

        Packed rows (`positions`, `doc_ids`, both (B, T), from `raybig.data.shards.Batch`): raybig's
        GPT keeps attention inside each example (a block-diagonal causal mask); a Hugging Face model
        gets `position_ids` restarting per example and no attention mask, from which transformers'
        masking utilities (5.x; the Llama, Qwen, Mistral, GPT-2 ... families) build the same
        block-diagonal mask; a plug-in gets `(x, y)` only (its examples may see each other).

        `validation`: score with `eval_task` when there is one (a distilled student's own data loss).
        """
        if self.task is not None:  # classifiers, masked LM, distillation: the task scores the logits
            batch: Any = (x, y)  # built-in classifier: x (B, *example_shape) float32, y (B,) labels
            if self.kind == "hf":
                batch = {"input_ids": x, "labels": y}
                if self.pad_id is not None:
                    batch["attention_mask"] = (x != self.pad_id).long()
            # Validation scores the student's own data loss, so a distilled run's val_loss compares
            # with an undistilled one's. An explicit flag: DeepSpeedEngine.eval() leaves the engine's
            # own `training` attribute True (it only switches the wrapped module).
            task = self.eval_task if self.eval_task is not None and validation else self.task
            loss, m = task.loss_and_metrics(engine, batch)
            self.metrics = {k: v for k, v in m.items() if k != "loss"}
            return loss
        if self.kind == "hf":
            if positions is not None:
                return engine(input_ids=x, labels=y, shift_labels=y, position_ids=positions).loss
            return engine(input_ids=x, labels=y, shift_labels=y).loss
        if self.kind == "plugin":  # the loss, (logits, loss) as nanoGPT, or .loss as Hugging Face
            from raybig.plugins import loss_of

            return loss_of(engine(x, y))
        if doc_ids is not None:
            return engine(x, y, positions=positions, doc_ids=doc_ids)
        return engine(x, y)


def hf_source(spec: TrainSpec) -> str | Mapping[str, Any]:
    """`model.hf`, or `model.hf_config` (a path or an inline mapping)."""
    m = spec.model
    src = m.hf if m.hf is not None else m.hf_config
    assert src is not None
    return src


def build(spec: TrainSpec, ds_config: Mapping[str, Any] | None = None, vocab_size: int | None = None) -> Built:
    """The model for `spec`, built the way its ZeRO stage needs, LoRA applied when asked.

    At ZeRO stage 3 every parameter is created already partitioned (`deepspeed.zero.Init`; for
    Hugging Face models the DeepSpeed config is registered with transformers before
    `from_pretrained`), so no rank ever holds the whole model; torch.distributed must be up.

    Args:
        spec: the train spec.
        ds_config: the DeepSpeed config the engine will get (its stage and dtype drive zero.Init).
        vocab_size: raybig's GPT's vocabulary (the run's tokenizer's).

    Raises:
        raybig.spec.hf_params.ModelSourceError: a bad model folder; LoraTargetError: LoRA targets
            matching nothing.
    """
    built = _build_student(spec, ds_config, vocab_size)
    if spec.distill is not None:
        from raybig.train.distill import load_teacher, shard_teacher, teacher_task

        teacher = load_teacher(spec)
        if int((ds_config or {}).get("zero_optimization", {}).get("stage", 0)) == 3:
            teacher = shard_teacher(teacher, ds_config or {})
        base = built.task if built.task is not None else _own_task(built)
        built.eval_task = base
        built.task = teacher_task(base, teacher, spec.distill.temperature, spec.distill.alpha)
    return built


def _own_task(built: Built) -> Any:
    """The causal-LM strategy scoring a GPT's / Hugging Face LM's logits (for distillation)."""
    from raybig.train.tasks import CausalLM

    return CausalLM()


def masked_lm_task(spec: TrainSpec, vocab_size: int | None) -> Any:
    """`raybig.train.tasks.MaskedLM` for the run's tokenizer: its [MASK] and special ids.

    A tokenizer without a mask token (bytes, raybig's BPE) gets id `vocab_size` (one past its last id;
    validation checked the model has that row); its EOS is special.
    """
    from raybig.train.tasks import MaskedLM

    p = spec.masked_lm.probability if spec.masked_lm is not None else 0.15
    tok = run_tokenizer(spec, None) if spec.tokenizer_kind() == "model" else None
    hf_tok = getattr(tok, "hf", None)
    if hf_tok is not None and hf_tok.mask_token_id is not None:
        return MaskedLM(int(hf_tok.mask_token_id), len(hf_tok), hf_tok.all_special_ids, p, spec.seed)
    n = int(vocab_size or BYTE_VOCAB)
    eos = getattr(tok, "eos_id", None)
    rows = n + 1
    return MaskedLM(n, rows, [eos] if eos is not None else [], p, spec.seed)


def _build_student(spec: TrainSpec, ds_config: Mapping[str, Any] | None, vocab_size: int | None) -> Built:
    """`build` without distillation: the model being trained and how its loss is taken."""
    stage3 = bool(ds_config) and int((ds_config or {}).get("zero_optimization", {}).get("stage", 0)) == 3
    keep = None
    if spec.task == "custom":  # a plug-in model on a plug-in dataset: forward(batch) -> loss, metrics
        from raybig.train.plugin_task import build_for_spec as build_custom

        return build_custom(spec)
    if spec.task == "classification":
        from raybig.train.classifiers import build_for_spec

        return build_for_spec(spec, ds_config)
    if spec.task == "masked_lm":
        from raybig.train import hf
        from raybig.train.tasks import MaskedBatches, PremaskedLM

        masker = masked_lm_task(spec, vocab_size)
        model = hf.build_head_model(hf_source(spec), "masked_lm", from_pretrained=spec.model.hf is not None,
                                    trust_remote_code=spec.model.trust_remote_code,
                                    zero3_config=ds_config if stage3 else None, seed=spec.seed)
        if spec.train.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return Built(model, "hf", keep=getattr(model, "_raybig_ds_config", None), task=PremaskedLM(),
                     wrap_batches=lambda b, rank: MaskedBatches(b, masker, spec.seed, rank))
    if spec.model.is_hf:
        from raybig.train import hf

        zcfg = ds_config if stage3 else None
        if spec.model.hf is not None:
            model = hf.load_causal_lm(spec.model.hf, dtype="fp32", trust_remote_code=spec.model.trust_remote_code,
                                      zero3_config=zcfg)
        else:
            model = hf.build_from_config(hf_source(spec), trust_remote_code=spec.model.trust_remote_code,
                                         zero3_config=zcfg, seed=spec.seed)
        keep = getattr(model, "_raybig_ds_config", None)
        model.config.use_cache = False  # training: no KV cache (and activation checkpointing needs it off)
        if spec.train.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        kind = "hf"
    elif spec.model.target is None:
        ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if stage3:
            import deepspeed

            ctx = deepspeed.zero.Init(config_dict_or_path=dict(ds_config or {}))
        with ctx:
            model = GPT(gpt_config(spec, vocab_size))
        kind = "gpt"
    else:
        model = build_model(spec)
        kind = "plugin"
    lora = spec.finetune.method == "lora"
    if lora:
        model = apply_lora(model, spec, kind)
    return Built(model, kind, lora, keep)


def lora_config(spec: TrainSpec, kind: str) -> Any:
    """Peft's `LoraConfig` for `spec.finetune` (biases frozen, as the validate-time count assumes)."""
    from peft import LoraConfig

    f = spec.finetune
    targets = spec.lora_targets()
    return LoraConfig(r=f.r, lora_alpha=f.alpha,  # type: ignore[arg-type]  # peft's hint says int; floats work lora_dropout=f.dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets), bias="none",
                      task_type="CAUSAL_LM" if kind == "hf" else None)


def apply_lora(model: nn.Module, spec: TrainSpec, kind: str) -> nn.Module:
    """`model` wrapped by peft with LoRA adapters; only the adapters' parameters require grad.

    Raises:
        raybig.spec.hf_params.LoraTargetError: the targets match no layer.
    """
    from peft import get_peft_model

    from raybig.spec.hf_params import LoraTargetError

    try:
        return get_peft_model(model, lora_config(spec, kind))
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            raise LoraTargetError(f"finetune.target_modules {spec.lora_targets()!r}: {e}") from None
        raise


# --------------------------------------------------------------------------- the run's tokenizer

TOKENIZER_FILE = "tokenizer.json"
"""A trained BPE's file in the run directory (every rank, every resume and the export read it)."""


def run_tokenizer(spec: TrainSpec, run_dir: str | None, rank: int = 0, barrier: Any = None) -> Any:
    """The tokenizer this run trains with: bytes, the HF folder's own, or the run's BPE.

    For `data.tokenizer: bpe` a byte-level BPE is trained on the training split (`data.vocab_size`)
    once per run, unless `<run_dir>/tokenizer.json` exists (a resumed run reuses it), and written
    there; every rank loads that one file. Under Ray Train it is trained in the driver before any
    worker starts (`raybig.train.runner.prepare_data` calls this with rank 0 and no barrier), so the
    workers only read it; another launcher (the benchmarks' torchrun loop) has rank 0 train it while
    the others wait in `barrier()`. Without a run dir each rank trains the same one (deterministic).

    Returns:
        An object with `name`, `vocab_size`, `encode(str) -> list[int]`, `decode(ids) -> str`.
    """
    from raybig.tokenizer import BYTES, BpeTokenizer, train_bpe

    kind = spec.tokenizer_kind()
    if kind == "bytes":
        return BYTES
    if kind == "model":
        from raybig.train.hf import load_tokenizer

        m = spec.model
        src = m.hf if m.hf is not None else m.hf_config
        assert isinstance(src, str)
        if m.hf is None and src.endswith(".json"):  # hf_config names a config.json: its folder's tokenizer
            src = src.rsplit("/", 1)[0]
        return load_tokenizer(src, trust_remote_code=m.trust_remote_code)
    from raybig import storage
    from raybig.data.text import split_texts

    if run_dir is None:
        train, _ = split_texts(spec.data)
        return train_bpe(train, spec.data.bpe_vocab())
    uri = storage.join(run_dir, TOKENIZER_FILE)
    if rank == 0 and not storage.exists(uri):
        train, _ = split_texts(spec.data)
        storage.write_text(uri, train_bpe(train, spec.data.bpe_vocab()).to_json())
    if barrier is not None:
        barrier()
    return BpeTokenizer.from_json(storage.read_text(uri))
