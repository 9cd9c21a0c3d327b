"""Build the network a spec names: the GPT, a Hugging Face model, or a user's plug-in factory.

Also the LoRA wrapping (`apply_lora`), so that the loop only sees `Built` (`raybig.train.built`):
a module for DeepSpeed plus how to get its loss.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from raybig.model import GPT
from raybig.tokenizer import BYTE_VOCAB
from raybig.train.built import Built, gpt_config, hf_source, load_target, run_tokenizer

if TYPE_CHECKING:
    from raybig.spec.models import TrainSpec


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


