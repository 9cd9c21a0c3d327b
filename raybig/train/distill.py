"""Distillation's teacher on each worker: loaded from an export, frozen, run in inference mode.

`load_teacher(spec)` reads `distill.teacher` (a run dir or an export dir, any fsspec URI):
- a built-in classifier's or raybig GPT's export loads as raybig's own module (`export.load_model`);
- any other Hugging Face export loads with the transformers auto class of the student's task.

The teacher is put in eval mode with every parameter frozen; `Teacher` calls it under
`torch.no_grad()` on the student's prepared inputs (`raybig.train.tasks.Distillation`) and moves it
to the inputs' device on the first call. Every worker holds the whole teacher (replicated, in the
training dtype): fine for a teacher a few times the student's size. For a teacher too large for
one worker, `shard_teacher` wraps it in a DeepSpeed ZeRO-3 engine without an optimizer
(ZeRO-Inference: each rank keeps 1/world of the parameters and gathers a layer at a time during
the forward); `build` uses it when the run itself trains at ZeRO stage 3.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from raybig.errors import TaskError

__all__ = ["Teacher", "load_teacher", "shard_teacher", "teacher_task"]


class Teacher(nn.Module):
    """A frozen teacher behind the call a task strategy makes: `teacher(inputs) -> logits`.

    Args:
        module: the teacher (raybig's GPT, a built-in classifier, a transformers model, or a
            DeepSpeed engine around one of them).
        hf: whether `module` is a transformers model (called with keywords, `.logits` taken).

    `inputs`: a tensor ((B, T) ids, or (B, ...) float features), or a dict of model keywords
    (`input_ids`, `attention_mask`); a raybig module gets `input_ids` only.
    """

    def __init__(self, module: nn.Module, hf: bool):
        super().__init__()
        self.module, self.hf = module, hf
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> Teacher:
        """Always stays in eval mode (no dropout), whatever the student's mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, inputs: Any) -> torch.Tensor:
        """Logits (B, T, V) or (B, C) for `inputs`, without gradients."""
        ref = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
        first = next(self.module.parameters(), None)
        if first is not None and first.device != ref.device and not hasattr(self.module, "zero_optimization"):
            self.module.to(ref.device)
        if self.hf:
            out = self.module(**inputs) if isinstance(inputs, Mapping) else self.module(input_ids=inputs)
            return out.logits
        x = inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
        return self.module(x)


def load_teacher(spec: Any) -> Teacher:
    """The teacher `spec.distill.teacher` names, frozen, on the CPU (moved to the device on first use).

    Raises:
        TaskError: no export there, or one this student's task cannot learn from.
    """
    from raybig.train.export import CONFIG, export_format, load_model, read_config, resolve_export

    try:
        folder = resolve_export(spec.distill.teacher)
    except FileNotFoundError as e:
        raise TaskError(f"distill.teacher: {e}") from None
    cfg = read_config(folder)
    prov = cfg.get("raybig") or {}
    raybig_module = export_format(cfg) != "hf" or (not spec.model.is_hf and spec.task == "causal_lm"
                                                    and "model" in prov)
    if raybig_module:
        model, _ = load_model(folder)
        return Teacher(model, hf=False)
    import transformers

    from raybig.train.hf import AUTO_CLASSES, resolve_model_source

    local = resolve_model_source(folder)
    auto = getattr(transformers, AUTO_CLASSES[spec.task])
    try:
        model = auto.from_pretrained(local, dtype=torch.float32, local_files_only=True, use_safetensors=True)
    except (ValueError, OSError) as e:
        raise TaskError(f"distill.teacher {folder}: cannot load it as a {spec.task} model ({CONFIG}: "
                        f"{cfg.get('architectures')}): {e}") from None
    return Teacher(model, hf=True)


def shard_teacher(teacher: Teacher, ds_config: Mapping[str, Any]) -> Teacher:
    """`teacher` partitioned over the ranks by a ZeRO-3 DeepSpeed engine without an optimizer (ZeRO-Inference).

    torch.distributed must be initialised (Ray Train's workers are). The engine gathers each layer's
    parameters for the forward and frees them after, so no rank holds the whole teacher at once
    after this call (it is loaded whole first, on the CPU).
    """
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": int(ds_config.get("train_micro_batch_size_per_gpu", 1)),
           "zero_optimization": {"stage": 3}}
    for k in ("bf16", "fp16"):
        if k in ds_config:
            cfg[k] = ds_config[k]
    engine, _, _, _ = deepspeed.initialize(model=teacher.module, config=cfg)
    engine.eval()
    out = Teacher.__new__(Teacher)
    nn.Module.__init__(out)
    out.module, out.hf = engine, teacher.hf
    return out


def teacher_task(base: Any, teacher: Teacher, temperature: float, alpha: float) -> Any:
    """`raybig.train.tasks.Distillation` of `base` (the student's own task) with `teacher`."""
    from raybig.train.tasks import Distillation

    return Distillation(base, teacher, temperature, alpha)
