"""Evaluate a finished train run: what `raybig eval` and a spec's `eval:` section (at the end of training) do.

- **Perplexity and bits per byte** of a causal LM on the run's held-out split: by default the very
  validation batches `val_loss` is computed on (every rank's `val_batch(0..eval_batches-1)` of the
  run's data, seed and world size), so `perplexity == exp(val_loss)` of the run's last evaluation,
  up to float rounding. `batches` evaluates more (or fewer) of them.
- **Accuracy** of a classifier (`task: classification`) over its whole validation split.
- **lm-eval tasks** (`raybig.eval.harness`) on the run's export, offline.

Results go to `<run>/eval.json` (`EVAL_FILE`) and come back as an `EvalReport`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from raybig import storage
from raybig.errors import EvalFailed, ReportError
from raybig.spec.models import TrainSpec

EVAL_FILE = "eval.json"
"""The results file in the run directory."""


@dataclass
class EvalReport:
    """What one evaluation of a run measured.

    Attributes:
        name: the run's name.
        run_dir: the run directory evaluated.
        export_dir: the export the model was loaded from.
        step: the last training step the run recorded.
        perplexity: causal LM only: `PerplexityResult.to_dict()` (nll_sum, tokens, num_bytes, mean_nll,
            perplexity, bits_per_byte) plus `batches` (windows evaluated) and `tokens_per_s`; else None.
        val_loss: the run's last recorded `val_loss` (nats/token), for comparison; None if none.
        classification: classifier only: `examples`, `val_loss`, `val_accuracy`; else None.
        masked_lm: masked LM only: `run_masked_lm`'s `val_loss`, `perplexity`, `masked_accuracy`,
            `tokens`, `batches`; else None.
        harness: lm-eval: task -> metric -> value; None when no tasks ran.
        harness_samples: lm-eval: task -> documents evaluated.
        seconds: wall time of the whole evaluation (s).
    """

    name: str
    run_dir: str
    export_dir: str
    step: int | None = None
    perplexity: dict[str, Any] | None = None
    val_loss: float | None = None
    classification: dict[str, Any] | None = None
    masked_lm: dict[str, Any] | None = None
    harness: dict[str, dict[str, float]] | None = None
    harness_samples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Every field as JSON-ready values (what `eval.json` holds)."""
        return asdict(self)

    def flat(self) -> dict[str, float]:
        """Numeric results as `eval/<name>` -> value (for MLflow and sweeps), finite values only."""
        out: dict[str, float] = {}
        for k in ("mean_nll", "perplexity", "bits_per_byte"):
            v = (self.perplexity or {}).get(k)
            if isinstance(v, int | float) and math.isfinite(v):
                out[f"eval/{k}"] = float(v)
        for k in ("val_loss", "val_accuracy"):
            v = (self.classification or {}).get(k)
            if isinstance(v, int | float) and math.isfinite(v):
                out[f"eval/{k}"] = float(v)
        for k in ("val_loss", "perplexity", "masked_accuracy"):
            v = (self.masked_lm or {}).get(k)
            if isinstance(v, int | float) and math.isfinite(v):
                out[f"eval/{k}"] = float(v)
        for task, metrics in (self.harness or {}).items():
            for k, v in metrics.items():
                if math.isfinite(v):
                    out[f"eval/{task}/{k}"] = float(v)
        return out

    @classmethod
    def from_run_dir(cls, run_dir: str) -> EvalReport:
        """The last evaluation written into `run_dir` (its `eval.json`).

        Raises:
            ReportError: no readable eval.json there.
        """
        uri = storage.join(storage.normalize(run_dir), EVAL_FILE)
        if not storage.exists(uri):
            raise ReportError(f"{run_dir}: no {EVAL_FILE} (run `raybig eval {run_dir}` first)")
        try:
            data = json.loads(storage.read_text(uri))
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError) as e:
            raise ReportError(f"{uri}: not an eval result ({e})") from None


def _last_val_loss(run_dir: str) -> tuple[float | None, int | None]:
    from raybig.train.result import read_metrics

    try:
        history = read_metrics(run_dir)
    except ReportError:
        return None, None
    vals = [h["val_loss"] for h in history if isinstance(h.get("val_loss"), int | float)]
    steps = [h["step"] for h in history]
    return (float(vals[-1]) if vals else None), (int(steps[-1]) if steps else None)


def _load_lm(export_dir: str, spec: TrainSpec, device: str) -> Any:
    """The export as a causal LM whose forward(idx) gives (B, T, V) logits (or `.logits`)."""
    if spec.model.is_hf:
        from transformers import AutoModelForCausalLM

        from raybig.eval.harness import offline

        with offline():
            model: Any = AutoModelForCausalLM.from_pretrained(export_dir, dtype="float32")
        return model.to(device).eval()
    if spec.model.target is not None:
        raise EvalFailed("perplexity needs a model whose forward(idx) returns logits; a model.target plug-in "
                         "is only required to return its loss (use --no-perplexity, or lm-eval tasks on an "
                         "export transformers loads)")
    from raybig.train.export import load_model

    model, _ = load_model(export_dir)
    return model.to(device).eval()


Window = tuple[Any, Any, Any, Any]
"""(idx, targets, positions or None, doc_ids or None), torch int64 (B, T) each."""


def val_windows(spec: TrainSpec, run_dir: str, tokenizer: Any, batches: int | None = None) -> list[Window]:
    """The held-out batches `val_loss` is computed on, every rank's, in rank order.

    The training loop's own source: the run's prepared token shards (`raybig.data.prepare`, found by
    their fingerprint; prepared here, in this process, if they are gone) read through
    `ShardBatches.get_val`, with each rank's seed and the run's world size. `batches` per rank
    (default `train.eval_batches`: exactly the run's validation batches).
    """
    import torch

    n = batches or spec.train.eval_batches
    out: list[Window] = []
    packed = spec.data.is_packed()
    for sb in val_streams(spec, tokenizer):
        for i in range(n):
            bt = sb.get_val(i)
            x, y = torch.from_numpy(bt.x), torch.from_numpy(bt.y)
            pos, docs = (torch.from_numpy(bt.positions), torch.from_numpy(bt.doc_ids)) if packed else (None, None)
            out.append((x, y, pos, docs))
    return out


def val_streams(spec: TrainSpec, tokenizer: Any) -> list[Any]:
    """Every rank's `ShardBatches` over the run's prepared token shards, in rank order (prepared here if gone)."""
    from raybig.data.prepare import prepare_spec, prepared_root
    from raybig.data.shards import ShardBatches

    tok = tokenizer if getattr(tokenizer, "name", "bytes") != "bytes" else None  # as the driver prepares it
    uri = prepare_spec(spec.data, prepared_root(spec.data, spec.storage.path), tok, use_ray=False).uri
    workers = spec.resources.workers
    return [ShardBatches(uri, spec.data.seq_len, spec.train.micro_batch_size, spec.seed, rank, workers,
                         packed=spec.data.is_packed()) for rank in range(workers)]


def run_masked_lm(spec: TrainSpec, run_dir: str, export_dir: str, *, batches: int | None = None,
                  device: str = "cpu") -> dict[str, Any]:
    """Masked-LM loss, perplexity and accuracy of an encoder export on the run's validation batches.

    The batches and their masks are exactly those `val_loss` used in training
    (`raybig.train.tasks.MaskedBatches.val_batch`: BERT masking keyed on seed, rank and batch), so
    `val_loss` here equals the run's last `val_loss` for the final weights. Perplexity is
    exp(mean cross-entropy over the chosen tokens), the masked-LM perplexity of Liu et al. 2019
    (RoBERTa, table 3), not a causal LM's.

    Returns:
        {"val_loss": the mean over batches of each batch's mean cross-entropy over its chosen tokens
        (nats; as `val_loss`), "perplexity": exp(val_loss), "masked_accuracy": fraction of chosen
        tokens predicted, "tokens": chosen tokens scored, "batches": micro batches}.

    Raises:
        EvalFailed: the export does not load as a masked LM.
    """
    import math

    import torch
    import transformers

    from raybig.train.build import masked_lm_task
    from raybig.train.built import run_tokenizer
    from raybig.train.hf import resolve_model_source
    from raybig.train.tasks import MaskedBatches, PremaskedLM

    tokenizer = run_tokenizer(spec, run_dir)
    try:
        model = transformers.AutoModelForMaskedLM.from_pretrained(
            resolve_model_source(export_dir), dtype=torch.float32, local_files_only=True, use_safetensors=True)
    except (ValueError, OSError) as e:
        raise EvalFailed(f"{export_dir}: cannot load it as a masked LM: {e}") from None
    model = model.to(device).eval()
    masker = masked_lm_task(spec, tokenizer.vocab_size)
    task = PremaskedLM()
    n = batches or spec.train.eval_batches
    total, count, correct, seen = 0.0, 0, 0, 0
    with torch.no_grad():
        for rank, sb in enumerate(val_streams(spec, tokenizer)):
            mb = MaskedBatches(sb, masker, spec.seed, rank)
            for i in range(n):
                x, y = mb.val_batch(i)
                inputs, labels = task.prepare((x.to(device), y.to(device)))
                logits = task.logits(model, inputs)
                loss, m = task.score(logits, labels)
                k = int((labels != -100).sum())
                total += float(loss)  # per-batch means, averaged as `loop.evaluate` does
                count += k
                correct += round(m["masked_accuracy"] * k)
                seen += 1
    mean = total / max(seen, 1)
    return {"val_loss": mean, "perplexity": math.exp(mean), "masked_accuracy": correct / max(count, 1),
            "tokens": count, "batches": seen}


def _byte_count(y: Any, tokenizer: Any) -> int:
    """UTF-8 bytes of the scored target tokens of one window (-100 left out)."""
    if getattr(tokenizer, "name", "") == "bytes":
        return int((y != -100).sum())  # one token is one byte
    return sum(len(tokenizer.decode([t for t in row if t != -100]).encode("utf-8")) for row in y.tolist())


def run_perplexity(spec: TrainSpec, run_dir: str, export_dir: str, *, batches: int | None = None,
                   device: str = "cpu") -> dict[str, Any]:
    """Perplexity and bits per byte of the export on the run's validation batches (see the module doc).

    Returns `PerplexityResult.to_dict()` (token-weighted: `mean_nll` = total NLL / scored tokens)
    plus `batch_mean_nll` (the mean of the batches' mean losses: `val_loss`'s own definition; the
    two agree when every batch scores the same number of tokens, as plain text does), `batches`
    and `tokens_per_s`.
    """
    import functools

    import torch

    from raybig.eval.perplexity import IGNORE_INDEX, PerplexityResult, token_nll
    from raybig.train.built import run_tokenizer

    tokenizer = run_tokenizer(spec, run_dir)
    model = _load_lm(export_dir, spec, device)
    windows = val_windows(spec, run_dir, tokenizer, batches)
    hf = spec.model.is_hf
    t0 = time.perf_counter()
    total, count, nbytes, batch_means = 0.0, 0, 0, []
    with torch.no_grad():
        for x, y, pos, docs in windows:
            fwd: Any = model
            if pos is not None:  # packed rows: each example attends to itself only, as in training
                fwd = (functools.partial(model, position_ids=pos.to(device)) if hf else
                       functools.partial(model, positions=pos.to(device), doc_ids=docs.to(device)))
            nll = token_nll(fwd, x.to(device), y.to(device)).double()
            scored = int((y != IGNORE_INDEX).sum())
            total += float(nll.sum())
            count += scored
            nbytes += _byte_count(y, tokenizer)
            batch_means.append(float(nll.sum()) / max(scored, 1))
    dt = time.perf_counter() - t0
    res = PerplexityResult(total, count, nbytes)
    return {**res.to_dict(), "batch_mean_nll": sum(batch_means) / max(len(batch_means), 1),
            "batches": len(windows), "tokens_per_s": res.tokens / max(dt, 1e-9)}


def run_classification(spec: TrainSpec, export_dir: str, device: str = "cpu") -> dict[str, Any]:
    """Loss and accuracy of a classifier export over its whole validation split.

    The split is the run's own (`raybig.train.classifiers.split_for_spec`: the same arrays, or for a
    Hugging Face sequence classifier the same text+label records, tokenizer and seeded split). A
    built-in classifier's export loads as raybig's module; any other as transformers'
    `AutoModelForSequenceClassification`, with padding masked out as in training.

    Returns:
        {"examples": N, "val_loss": mean cross-entropy (nats), "val_accuracy": fraction in [0, 1]}.

    Raises:
        EvalFailed: the export does not load as a classifier.
    """
    import torch

    from raybig.train.classifiers import pad_id_of, split_for_spec
    from raybig.train.export import export_format, load_model, read_config
    from raybig.train.tasks import Classification

    split = split_for_spec(spec)
    pad_id: int | None = None
    if export_format(read_config(export_dir)) == "hf" and spec.model.is_hf:
        import transformers

        from raybig.train.built import run_tokenizer
        from raybig.train.hf import resolve_model_source

        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                resolve_model_source(export_dir), dtype=torch.float32, local_files_only=True, use_safetensors=True)
        except (ValueError, OSError) as e:
            raise EvalFailed(f"{export_dir}: cannot load it as a sequence classifier: {e}") from None
        pad_id = pad_id_of(run_tokenizer(spec, None))
    else:
        model, _ = load_model(export_dir)
    model = model.to(device).eval()
    task = Classification(split.num_classes)
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(split.y_val), 256):
            x = torch.from_numpy(split.x_val[i:i + 256]).to(device)
            y = torch.from_numpy(split.y_val[i:i + 256]).to(device)
            batch: Any = (x, y) if pad_id is None else {"input_ids": x, "attention_mask": (x != pad_id).long(),
                                                         "labels": y}
            inputs, labels = task.prepare(batch)
            logits = task.logits(model, inputs)
            loss, _ = task.score(logits, labels)
            loss_sum += float(loss) * len(y)
            correct += int((logits.argmax(-1) == labels).sum())
    n = len(split.y_val)
    return {"examples": n, "val_loss": loss_sum / n, "val_accuracy": correct / n}


def evaluate_run(spec: TrainSpec, run_dir: str, *, tasks: list[str] | None = None, perplexity: bool | None = None,
                 batches: int | None = None, limit: int | None = None, batch_size: int | None = None,
                 device: str = "cpu", write: bool = True) -> EvalReport:
    """Evaluate the export of the run `spec` made in `run_dir`; write `<run_dir>/eval.json` unless `write` is False.

    Args:
        spec: the run's train spec (paths absolute, as the run's spec.yaml has them).
        run_dir: the run directory (local or fsspec URI) holding `export/`.
        tasks: lm-eval tasks (names or task files); None: the spec's `eval.tasks`.
        perplexity: measure perplexity (causal LM) / accuracy (classifier); None: the spec's
            `eval.perplexity` (default true).
        batches: validation batches per rank (default `train.eval_batches`, i.e. `val_loss`'s own).
        limit: lm-eval documents per task (None: the spec's `eval.limit`, else all).
        batch_size: lm-eval batch size (None: the spec's `eval.batch_size`, else 8).
        device: torch device (`cpu`, `cuda:0`).
        write: write eval.json.

    Raises:
        EvalFailed: the run has no export yet, or the model cannot be evaluated.
        EvalTaskError: a task is unknown or its file is malformed (before the model is loaded).
    """
    from raybig.eval.harness import load_task_config, run_harness
    from raybig.train.result import export_of

    t0 = time.time()
    cfg = spec.eval
    tasks = list(cfg.tasks if cfg else []) if tasks is None else list(tasks)
    for t in tasks:  # a bad task fails here, before any model is loaded
        load_task_config(t)
    if tasks and spec.task != "causal_lm":
        raise EvalFailed(f"lm-eval tasks score causal LMs; this run's task is {spec.task}")
    perplexity = (cfg.perplexity if cfg else True) if perplexity is None else perplexity
    run_dir = storage.normalize(run_dir)
    export = export_of(run_dir)
    if export is None:
        raise EvalFailed(f"{run_dir} has no export yet (a run writes export/ when it finishes; "
                         f"`raybig export {run_dir}` writes one from its newest checkpoint)")
    val_loss, step = _last_val_loss(run_dir)
    report = EvalReport(name=spec.name, run_dir=run_dir, export_dir=export, step=step, val_loss=val_loss)
    if perplexity and spec.task == "classification":
        report.classification = run_classification(spec, export, device)
    elif perplexity and spec.task == "masked_lm":
        report.masked_lm = run_masked_lm(spec, run_dir, export, batches=batches, device=device)
    elif perplexity:
        report.perplexity = run_perplexity(spec, run_dir, export, batches=batches, device=device)
    if tasks:
        if not storage.is_local(export):
            raise EvalFailed(f"lm-eval reads a local export folder; {export} is remote (copy it here first)")
        h = run_harness(storage.normalize(export), tasks, device=device,
                        batch_size=batch_size or (cfg.batch_size if cfg else 8),
                        limit=limit if limit is not None else (cfg.limit if cfg else None))
        report.harness, report.harness_samples = h.metrics, h.samples
    report.seconds = round(time.time() - t0, 2)
    if write:
        storage.write_text(storage.join(run_dir, EVAL_FILE), json.dumps(report.to_json(), indent=2, default=str))
    return report


def evaluate_after_training(spec: TrainSpec, result: Any, note: Any = None) -> EvalReport | None:
    """The spec's `eval:` section on a run that just finished: `evaluate_run`, then into the result.

    The report goes to `<run>/eval.json`, to `result.evaluation` (and run.json's result), and, for a
    tracked run, into its MLflow run as `eval/...` metrics at the last step. An evaluation that
    fails does not undo the training: `result.evaluation` is `{"error": ...}` and `note` says so.

    Args:
        spec: the run's train spec.
        result: its `TrainResult` (updated in place).
        note: called with one line for a person (optional).
    """
    from raybig.errors import RaybigError
    from raybig.train.result import write_result
    from raybig.train.tracking import log_to_run

    if result.export_dir is None:
        return None
    try:
        rep = evaluate_run(spec, result.run_dir)
    except RaybigError as e:
        result.evaluation = {"error": str(e)}
        if note is not None:
            note(f"evaluation failed (the training result stands): {e}")
        write_result(result.run_dir, result)
        return None
    result.evaluation = rep.to_json()
    write_result(result.run_dir, result)
    log_to_run(spec, result.run_dir, rep.flat(), int(rep.step or result.steps))
    if note is not None:
        parts = [f"{k.removeprefix('eval/')} {v:.4g}" for k, v in rep.flat().items()]
        note(f"eval: {', '.join(parts[:8])} ({rep.seconds}s; {result.run_dir}/{EVAL_FILE})")
    return rep
