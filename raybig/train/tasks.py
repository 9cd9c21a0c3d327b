"""What a training step optimises, as small strategy objects chosen by the spec's `task` name.

Each strategy turns a batch into model inputs and labels (`prepare`), runs the model (`logits`), and
scores the logits (`score`); `loss_and_metrics(model, batch)` chains the three and is all a training
loop calls. Splitting them lets `Distillation` feed the same prepared inputs (the same random MLM
mask) to a student and a teacher.

- `causal_lm`: next-token cross-entropy (raybig's loss today).
- `masked_lm`: BERT masking, 15% of tokens, 80/10/10 (Devlin et al. 2019).
- `classification`: cross-entropy and accuracy over class logits.
- `distill_loss` / `Distillation`: Hinton et al. 2015 soft targets mixed with the data loss.

Batches are either `(x, y)` tuples of tensors or dicts (transformers' names: `input_ids`,
`attention_mask`, `labels`). Metrics are Python floats (already `.item()`-ed), named without rank
or split; the loop adds prefixes (`val_`) and reduces them across ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch.nn import functional as F

from raybig.errors import TaskError

IGNORE_INDEX = -100
"""Labels equal to this are not scored (PyTorch and transformers convention)."""

TASKS = ("causal_lm", "masked_lm", "classification")
"""Values the spec's `task` field may take (`causal_lm` is the default)."""


class TaskStrategy(Protocol):
    """The contract a training loop relies on (see the module docstring)."""

    name: str

    def prepare(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """Batch -> (model inputs: a tensor or a dict of keyword tensors, labels tensor)."""
        ...

    def logits(self, model: Any, inputs: Any) -> torch.Tensor:
        """Model outputs as logits (..., V)."""
        ...

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar float32 loss with grad, metrics)."""
        ...

    def loss_and_metrics(self, model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Prepare, run the model, score."""
        ...


def _call(model: Any, inputs: Any) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return out.logits if hasattr(out, "logits") else out  # transformers returns a ModelOutput


def _split(batch: Any, x_keys: Sequence[str], y_keys: Sequence[str]) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, Mapping):
        y = next((batch[k] for k in y_keys if k in batch), None)
        if y is None:
            raise TaskError(f"batch has no labels: expected one of {list(y_keys)}, got {sorted(batch)}")
        rest = {k: v for k, v in batch.items() if k not in y_keys}
        if set(rest) == {"x"}:  # arrays: {"x": features, "y": labels}
            return rest["x"], y
        return rest, y
    x, y = batch
    return x, y


class _Base:
    name = ""

    def prepare(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """Batch -> (model inputs, labels); each task defines it."""
        raise NotImplementedError

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, metrics) of logits against labels; each task defines it."""
        raise NotImplementedError

    def logits(self, model: Any, inputs: Any) -> torch.Tensor:
        """Run `model` on `inputs` (a tensor, or a dict passed as keywords); the logits tensor."""
        return _call(model, inputs)

    def loss_and_metrics(self, model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Prepare, run the model, score: (scalar loss with grad, float metrics)."""
        inputs, labels = self.prepare(batch)
        return self.score(self.logits(model, inputs), labels)


def _token_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    V = logits.size(-1)
    flat, lab = logits.reshape(-1, V).float(), labels.reshape(-1).to(logits.device)
    loss = F.cross_entropy(flat, lab, ignore_index=IGNORE_INDEX)
    keep = lab != IGNORE_INDEX
    correct = (flat.argmax(-1)[keep] == lab[keep]).sum()
    return loss, correct, int(keep.sum())


class CausalLM(_Base):
    """Next-token prediction.

    Batch: `(x, y)` (B, T) int64 with y already shifted (raybig's `Batches`), or a dict with `input_ids` and `labels` (pre-shifted the same way; -100 is not scored).

    Metrics: `loss` (mean token NLL, nats) and `token_accuracy` (argmax = target).
    """

    name = "causal_lm"

    def prepare(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """(input ids (B, T) int64, or a dict of model keywords; labels (B, T) int64)."""
        inputs, labels = _split(batch, ("input_ids", "x"), ("labels", "targets", "y"))
        if isinstance(inputs, Mapping) and len(inputs) == 0:
            raise TaskError("causal_lm batch has no inputs")
        return inputs, labels

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy over (B, T, V) float logits vs (B, T) int64 labels; float32 scalar loss."""
        loss, correct, n = _token_ce(logits, labels)
        return loss, {"loss": float(loss.detach()), "token_accuracy": float(correct) / max(n, 1)}


def _split_lm(batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise TaskError(f"masked_lm batch needs input_ids, got {sorted(batch)}")
        return {k: v for k, v in batch.items() if k != "labels"}, batch["input_ids"]
    ids = batch[0] if isinstance(batch, (tuple, list)) else batch
    return {"input_ids": ids}, ids


class MaskedLM(_Base):
    """BERT's masked-LM objective (Devlin et al. 2019, "BERT", section 3.1 and appendix A.1).

    Of the tokens that are neither special nor padding, each is chosen with probability
    `mlm_probability` (15%); a chosen token becomes `mask_token_id` 80% of the time, a uniformly random
    token 10%, and stays itself 10%; only chosen tokens are scored. This is the recipe of
    transformers' `DataCollatorForLanguageModeling`. One deviation: a row with eligible tokens where
    none was chosen gets one chosen at random, so short rows never give an empty (NaN) loss.

    Args:
        mask_token_id: the [MASK] id.
        vocab_size: random replacements are drawn from [0, vocab_size) minus `special_ids`.
        special_ids: ids never chosen (CLS, SEP, PAD, ...), nor drawn as replacements.
        mlm_probability: fraction of eligible tokens chosen.
        seed: seeds this strategy's own generator (masks are reproducible and differ per step).

    Batch: (B, T) int64 ids, an `(ids, ...)` tuple, or a dict with `input_ids` (and optionally
    `attention_mask`, whose zeros are padding). Metrics: `loss`, `masked_accuracy`.
    """

    name = "masked_lm"

    def __init__(self, mask_token_id: int, vocab_size: int, special_ids: Sequence[int] = (),
                 mlm_probability: float = 0.15, seed: int = 0):
        if not 0.0 < mlm_probability < 1.0:
            raise TaskError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if not 0 <= mask_token_id < vocab_size:
            raise TaskError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size})")
        self.mask_token_id, self.vocab_size = mask_token_id, vocab_size
        self.special_ids = sorted(set(special_ids) | {mask_token_id})
        self.mlm_probability = mlm_probability
        self.generator = torch.Generator().manual_seed(seed)

    def mask_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) int64 ids -> (masked ids, labels), both (B, T) int64; labels -100 where not chosen.

        `generator` (default: this strategy's own) draws the choices; `MaskedBatches` passes one keyed
        on (seed, rank, step, micro) so that a resumed run masks exactly as the first attempt did.
        """
        ids = input_ids.detach().cpu()
        g = generator if generator is not None else self.generator
        eligible = ~torch.isin(ids, torch.tensor(self.special_ids))
        if attention_mask is not None:
            eligible &= attention_mask.detach().cpu().bool()
        chosen = (torch.rand(ids.shape, generator=g) < self.mlm_probability) & eligible
        empty = ~chosen.any(dim=1) & eligible.any(dim=1)
        for r in empty.nonzero().flatten().tolist():  # rare: short rows
            cols = eligible[r].nonzero().flatten()
            chosen[r, cols[torch.randint(len(cols), (1,), generator=g)]] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        u = torch.rand(ids.shape, generator=g)
        to_mask = chosen & (u < 0.8)
        to_random = chosen & (u >= 0.8) & (u < 0.9)
        pool = torch.tensor([i for i in range(self.vocab_size) if i not in set(self.special_ids)])
        random_ids = pool[torch.randint(len(pool), ids.shape, generator=g)]
        masked = torch.where(to_mask, torch.full_like(ids, self.mask_token_id), ids)
        masked = torch.where(to_random, random_ids, masked)
        return masked.to(input_ids.device), labels.to(input_ids.device)

    def prepare(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """Mask the batch: (dict with masked `input_ids` (+ `attention_mask`), labels (B, T))."""
        inputs, ids = _split_lm(batch)
        masked, labels = self.mask_tokens(ids, inputs.get("attention_mask"))
        return {**inputs, "input_ids": masked}, labels

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy over chosen positions only; float32 scalar loss."""
        loss, correct, n = _token_ce(logits, labels)
        return loss, {"loss": float(loss.detach()), "masked_accuracy": float(correct) / max(n, 1)}


class PremaskedLM(_Base):
    """Masked-LM scoring of batches already masked by `MaskedBatches` (x: masked ids, y: labels, -100 unscored).

    Args:
        pad_id: when given, `attention_mask` = ids != pad_id (None: every position attends).

    Metrics: `loss` (mean cross-entropy over chosen tokens, nats), `masked_accuracy`.
    """

    name = "masked_lm"

    def __init__(self, pad_id: int | None = None):
        self.pad_id = pad_id

    def prepare(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """((B, T) masked ids as model keywords, (B, T) labels)."""
        inputs, labels = _split(batch, ("input_ids", "x"), ("labels", "y"))
        ids = inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
        kw = {"input_ids": ids}
        if self.pad_id is not None:
            kw["attention_mask"] = (ids != self.pad_id).long()
        return kw, labels

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy over chosen positions only; float32 scalar loss."""
        loss, correct, n = _token_ce(logits, labels)
        return loss, {"loss": float(loss.detach()), "masked_accuracy": float(correct) / max(n, 1)}


class _Masked:
    """One masked micro batch in the shape the training loop feeds: x (masked ids), y (labels), numpy."""

    positions = None
    doc_ids = None

    def __init__(self, x: Any, y: Any):
        self.x, self.y = x, y


class MaskedBatches:
    """Token-shard batches with BERT masking applied, deterministically per (seed, rank, step, micro).

    Wraps a `raybig.data.shards.ShardBatches` (unpacked text windows): `get(step, micro)` masks the
    window `x` with a generator seeded from (seed, rank, step, micro), so a resumed run masks the
    same tokens; `val_batch(i)` masks validation batch i with a key of its own (the same every
    evaluation, so val_loss is comparable across evaluations). y holds the labels (-100 where a token
    was not chosen); the shifted next-token targets of the shards are not used.
    """

    packed = False

    def __init__(self, base: Any, masker: MaskedLM, seed: int, rank: int):
        self.base, self.masker, self.seed, self.rank = base, masker, seed, rank
        self.val = base.val  # the loop asks whether there is a validation split

    def _generator(self, *key: int) -> torch.Generator:
        import numpy as np

        state = np.random.SeedSequence([self.seed, self.rank, *key]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def get(self, step: int, micro: int) -> _Masked:
        """Micro batch (step, micro): masked ids and labels, (B, T) int64 numpy."""
        bt = self.base.get(step, micro)
        x, y = self.masker.mask_tokens(torch.from_numpy(bt.x.astype("int64")), generator=self._generator(step, micro))
        return _Masked(x.numpy(), y.numpy())

    def val_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation batch i, masked the same way every time: (masked ids, labels), (B, T) int64."""
        bt = self.base.get_val(i)
        return self.masker.mask_tokens(torch.from_numpy(bt.x.astype("int64")), generator=self._generator(2**31, i))

    def __getattr__(self, name: str) -> Any:  # bytes_read, index, ... of the wrapped stream
        return getattr(self.base, name)


class Classification(_Base):
    """One label per example: cross-entropy and accuracy.

    Batch: `(x, y)` with y (B,) int64 in [0, num_classes), x whatever the model takes (float32
    features/images for the built-in MLP/CNN, (B, T) ids for a sequence classifier); or a dict
    (`labels` plus model keywords such as `input_ids`, `attention_mask`).

    Args:
        num_classes: when given, labels are checked to lie in [0, num_classes) (`TaskError` if not)
            and the logits' last dimension must equal it.

    Metrics: `loss` (mean cross-entropy, nats), `accuracy` (fraction of argmax = label).
    """

    name = "classification"

    def __init__(self, num_classes: int | None = None):
        self.num_classes = num_classes

    def prepare(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """(model inputs, labels (B,) int64), labels range-checked when `num_classes` is known."""
        inputs, labels = _split(batch, ("x", "input_ids"), ("labels", "label", "y"))
        if self.num_classes is not None and labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise TaskError(f"labels must be in [0, {self.num_classes}), found values in [{lo}, {hi}]")
        return inputs, labels.long()

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of (B, C) logits vs (B,) labels; float32 scalar loss."""
        if logits.dim() != 2:
            raise TaskError(f"classification needs (batch, classes) logits, got shape {tuple(logits.shape)}")
        if self.num_classes is not None and logits.size(-1) != self.num_classes:
            raise TaskError(f"the model's head has {logits.size(-1)} outputs but the task has "
                            f"{self.num_classes} classes")
        labels = labels.to(logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"loss": float(loss.detach()), "accuracy": float(acc)}


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float = 2.0, alpha: float = 0.5,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Knowledge-distillation loss of Hinton, Vinyals and Dean 2015 (arXiv:1503.02531, section 2).

        alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

    The T^2 factor keeps the soft-target gradients' scale independent of T (the paper's section 2.1).
    KL and CE are means over the positions whose label is not `ignore_index`.

    Args:
        student_logits: (N, V) or (..., V) float logits (any float dtype; computed in float32).
        teacher_logits: same shape as `student_logits`; gradients are not taken through it.
        labels: (N,) or (...) int64 hard labels; `ignore_index` positions are left out of both terms.
        temperature: T > 0.
        alpha: weight of the soft-target term, in [0, 1].
        ignore_index: label value of positions to leave out (padding, unmasked MLM tokens).

    Returns:
        Scalar float32 loss.

    Raises:
        TaskError: shapes differ, T <= 0, or alpha outside [0, 1].
    """
    if student_logits.shape != teacher_logits.shape:
        raise TaskError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                        f"{tuple(teacher_logits.shape)} differ (different vocabularies or heads?)")
    if not temperature > 0:
        raise TaskError(f"distillation temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise TaskError(f"distillation alpha must be in [0, 1], got {alpha}")
    V = student_logits.size(-1)
    s = student_logits.reshape(-1, V).float()
    t = teacher_logits.detach().reshape(-1, V).float().to(s.device)
    lab = labels.reshape(-1).to(s.device)
    keep = lab != ignore_index
    s, t, lab = s[keep], t[keep], lab[keep]
    soft, ce = _distill_terms(s, t, lab, temperature)
    return alpha * soft + (1 - alpha) * ce


def _distill_terms(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T^2 * KL(teacher_T || student_T), CE(student, labels)) of (N, V) float32 logits, (N,) labels."""
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  reduction="batchmean", log_target=True)
    return temperature**2 * kl, F.cross_entropy(s, labels)


class Distillation:
    """A task's objective mixed with a frozen teacher's soft targets (see `distill_loss`).

    The teacher sees exactly the student's prepared inputs (the same MLM mask), runs in eval mode
    under `no_grad`, and may be any module the base task can call (a DeepSpeed ZeRO-3 inference
    engine included). Its logits must have the student's shape (same vocabulary or classes).

    Metrics: the base task's metrics on the student (the loop's `loss` is the mixed loss that is
    optimised) plus `distill_loss`, the soft-target term T^2 * KL alone (before the alpha weight).
    Validation scores the base task alone (`Built.eval_task`), so `val_loss` compares with an
    undistilled run's.
    """

    def __init__(self, base: Any, teacher: Any, temperature: float = 2.0, alpha: float = 0.5):
        self.base, self.teacher = base, teacher
        self.temperature, self.alpha = temperature, alpha
        self.name = f"{base.name}+distill"
        if hasattr(teacher, "eval"):
            teacher.eval()

    def loss_and_metrics(self, model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(mixed loss with grad through the student only, metrics)."""
        inputs, labels = self.base.prepare(batch)
        s = self.base.logits(model, inputs)
        with torch.no_grad():
            t = self.base.logits(self.teacher, inputs)
        _, metrics = self.base.score(s.detach(), labels)
        loss = distill_loss(s, t, labels, self.temperature, self.alpha)
        V = s.size(-1)
        lab = labels.reshape(-1).to(s.device)
        keep = lab != IGNORE_INDEX
        with torch.no_grad():
            soft, _ = _distill_terms(s.detach().reshape(-1, V).float()[keep],
                                     t.reshape(-1, V).float().to(s.device)[keep], lab[keep], self.temperature)
        return loss, {**metrics, "distill_loss": float(soft)}


def get_task(name: str = "causal_lm", **options: Any) -> TaskStrategy:
    """The strategy for a spec's `task` name, built with `options` (the task's constructor keywords).

    Raises:
        TaskError: unknown name, or options the task does not take / rejects.
    """
    classes: dict[str, Any] = {"causal_lm": CausalLM, "masked_lm": MaskedLM, "classification": Classification}
    if name not in classes:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    try:
        return classes[name](**options)
    except TypeError as e:
        raise TaskError(f"task {name!r}: {e}") from None
