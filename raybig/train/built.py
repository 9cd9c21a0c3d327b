"""What every model builder shares: the `Built` record the loop trains, and the run's tokenizer.

`raybig.train.build` picks the builder for a spec (GPT, Hugging Face, plug-in, classifier, masked
LM, distillation); the builders (`raybig.train.classifiers`, `raybig.train.plugin_task`) and the
export (`raybig.train.export`) take these pieces from here, so none of them imports `build`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from raybig.model import GPTConfig
from raybig.tokenizer import BYTE_VOCAB

if TYPE_CHECKING:
    from raybig.spec.models import TrainSpec

__all__ = ["TOKENIZER_FILE", "Built", "gpt_config", "hf_source", "load_target", "run_tokenizer"]


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
