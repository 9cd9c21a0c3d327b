"""`kind: sweep`: a Ray Tune search over a base train spec, every trial a distributed DeepSpeed run.

    kind: sweep
    name: lr-bs
    base: jobs/debug.yaml            # or an inline train spec mapping
    search:
      train.lr: {loguniform: [1.0e-5, 3.0e-3]}
      train.micro_batch_size: {choice: [4, 8, 16]}
      deepspeed.zero_stage: {grid: [2, 3]}

Search keys are dotted paths into the train spec. Every sampled value goes through the train
spec's own validation, here at validate time (each value on its own, the bounds of ranges) and
again per trial at run time, so a bad value fails the same way it would in a train job.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from raybig.errors import Issue, SpecError
from raybig.spec import paths, secrets
from raybig.spec.base import NAME_RE, Name, QueuedSpec, Strict, at
from raybig.spec.issues import did_you_mean, first_error
from raybig.spec.models import StorageSpec, TrackingSpec, TrainSpec

DIST_KINDS = ("uniform", "loguniform", "randint", "choice", "grid", "value")
# Paths a sweep may not vary: they name the run, not a hyperparameter.
FROZEN_PATHS = {"kind", "name", "storage", "storage.path"}


class Distribution(Strict):
    """One search axis. Exactly one key; a bare scalar means a constant (`value`)."""

    uniform: tuple[float, float] | None = Field(None, description="[low, high] sampled uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high] sampled log-uniformly.")
    randint: tuple[int, int] | None = Field(None, description="[low, high] integers, both ends included.")
    choice: list[Any] | None = Field(None, min_length=1, description="Sampled from these values (with "
                                     "algorithm grid: every value is tried, like grid).")
    grid: list[Any] | None = Field(None, min_length=1, description="Every value is tried (a grid axis).")
    value: Any = Field(None, description="A constant applied to every trial.")

    @model_validator(mode="before")
    @classmethod
    def _scalar(cls, v: Any) -> Any:
        found = secrets.find_secret(v)
        if found is not None:  # Tune writes sampled values into its own files, in clear
            names = ", ".join(f"${{{n}}}" for n in found.names)
            raise ValueError(f"a search value comes from {names} (a secret-looking variable); "
                             "secrets cannot be searched")
        if not isinstance(v, dict):
            return {"value": v}
        return v

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        given = [k for k in DIST_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DIST_KINDS)} (got {', '.join(given) or 'none'})")
        k = given[0]
        if k in ("uniform", "loguniform", "randint"):
            lo, hi = getattr(self, k)
            if not lo < hi:
                raise at(k, f"low must be below high (got [{lo}, {hi}])")
            if k == "loguniform" and lo <= 0:
                raise at(k, f"loguniform needs low > 0 (got {lo})")
        return self

    @property
    def kind(self) -> str:
        """Which distribution this axis is (the one key given)."""
        return next(k for k in DIST_KINDS if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values checked against the train spec at validate time: every listed value, range bounds."""
        k = self.kind
        if k in ("choice", "grid"):
            return list(getattr(self, k))
        if k == "value":
            return [self.value]
        lo, hi = getattr(self, k)
        return [lo, hi]


class SweepSpec(QueuedSpec):
    """A hyperparameter sweep: Ray Tune trials, each a multi-worker DeepSpeed train run."""

    kind: Literal["sweep"] = "sweep"
    name: Name = Field(..., pattern=NAME_RE, description="Sweep name; also its output directory's name.")
    base: TrainSpec = Field(..., description="The train spec every trial starts from: an inline mapping, "
                            "or a path to a train spec file (relative to this file).")
    search: dict[str, Distribution] = Field(..., min_length=1, description="Dotted train-spec path -> "
                                            "distribution (uniform, loguniform, randint, choice, grid, "
                                            "or a constant).")
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random sampling (grid axes crossed), grid (every grid and choice value "
        "crossed), or Optuna TPE.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds the search algorithm (reproducible sweeps).")
    num_samples: int | None = Field(None, ge=1, le=10_000, description="Trials to run (default: the grid's "
                                    "size for grid, else 8 or the grid's size). Must cover the grid; "
                                    "random sampling repeats the grid num_samples // grid times.")
    max_concurrent_trials: int = Field(1, ge=1, le=1024, description="Trials running at once.")
    metric: str = Field("val_loss", min_length=1, description="Metric to optimise: one the base spec's "
                        "training reports (val_loss, loss, val_accuracy for a classifier, ...) or an "
                        "end-of-training evaluation result of its `eval:` section (eval.perplexity, "
                        "eval.bits_per_byte, eval.val_accuracy, eval.<lm-eval task>.<metric>); see "
                        "`metric_names`.")
    mode: Literal["min", "max"] = Field("min", description="Minimise or maximise `metric`.")
    scheduler: Literal["asha", "none"] = Field("asha", description="ASHA early stopping, or none.")
    time_attr: Literal["steps", "tokens"] = Field("steps", description="What grace_period and max_t count.")
    grace_period: int = Field(1, ge=1, description="ASHA: steps (or tokens) every trial runs before it can "
                              "be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, le=100.0, description="ASHA: keep the top 1/rf at each rung.")
    max_t: int | None = Field(None, ge=1, description="ASHA: longest a trial runs, in steps (or tokens); "
                              "default: the base spec's steps.")
    fixed_global_batch: bool = Field(False, description="Keep micro_batch x grad_accum x workers at the base "
                                     "spec's value by setting grad_accum per trial (batch-size sweeps "
                                     "compare like with like).")
    trial_failures: int = Field(0, ge=0, le=100, description="Tune retries of a failed trial.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Where the sweep's directory goes.")
    tracking: TrackingSpec | None = Field(None, description="MLflow: one parent run for the sweep and one "
                                          "nested child run per trial (default: the base spec's tracking).")

    @field_validator("base", mode="before")
    @classmethod
    def _load_base(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str):
            # The loader hands itself over in the context (`raybig.spec.validate_data`): a sweep
            # reads its base file without importing the package that imports it.
            load_spec = (info.context or {}).get("load_spec")
            if load_spec is None:
                raise ValueError("a base given as a file path is read by raybig.spec.load_spec; "
                                 "validate this sweep through it")
            src = (info.context or {}).get("source")
            path = v
            if "://" not in v and not os.path.isabs(v) and src and "://" not in src:
                here = os.path.join(os.path.dirname(os.path.abspath(src)), v)
                path = here if os.path.exists(here) or not os.path.exists(v) else v
            if "://" not in path and not os.path.isfile(path):
                raise ValueError(f"no train spec file at {path!r} (a relative path is read beside this file)")
            spec = load_spec(path)  # SpecError with the base file's own lines
            if spec.kind != "train":
                raise ValueError(f"{v!r} is a {spec.kind!r} spec; base must be a train spec")
            return spec
        if isinstance(v, dict):
            v = {"name": "trial", **v}  # trials get their own names; the base needs none
            if v.get("kind", "train") != "train":
                raise ValueError(f"base must be a train spec (got kind {v.get('kind')!r})")
        return v

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> SweepSpec:
        loaded = (info.context or {}).get("loaded") if info.context else None
        issues = [Issue(("search", key, *sub), msg) for key, sub, msg in check_search(self)]
        issues += [Issue((field,), msg) for field, msg in check_budget(self)]
        if (problem := check_metric(self)) is not None:
            issues.append(Issue(("metric",), problem))
        if issues:
            for i in issues:
                if loaded is not None:
                    i.line, i.source = loaded.line_of(i.path), loaded.source
            # SpecError passes through pydantic untouched, so the search key (which holds dots) keeps
            # its own line instead of being split at the dots by the generic re-anchoring.
            raise SpecError(issues)
        return self

    # --- derived -------------------------------------------------------------------------------

    def mlflow(self) -> Any:
        """The `MlflowSpec` trials are tracked in: the sweep's `tracking.mlflow`, else the base's; or None."""
        for t in (self.tracking, self.base.tracking):
            if t is not None and t.mlflow is not None:
                return t.mlflow
        return None

    def metric_is_eval(self) -> bool:
        """Whether `metric` is an end-of-training evaluation result (`eval.`), measured once per trial."""
        return self.metric.startswith(EVAL_PREFIX)

    def grid_axes(self) -> dict[str, list[Any]]:
        """Search key -> values tried one by one: grid axes, and with algorithm grid choice axes too."""
        out: dict[str, list[Any]] = {}
        for key, d in self.search.items():
            if d.grid is not None:
                out[key] = list(d.grid)
            elif d.choice is not None and self.algorithm == "grid":
                out[key] = list(d.choice)
        return out

    def grid_size(self) -> int:
        """Points in the grid: the product of every grid axis's length (1 with none); see `grid_axes`."""
        return math.prod(len(v) for v in self.grid_axes().values())

    def total_trials(self) -> int:
        """Trials the sweep runs (see num_samples)."""
        g = self.grid_size()
        if self.algorithm == "grid":
            return self.num_samples // g * g if self.num_samples else g
        n = self.num_samples or max(8, g)
        return n // g * g

    def horizon(self) -> int:
        """max_t in the unit of time_attr."""
        if self.max_t is not None:
            return self.max_t
        steps = self.base.train.steps
        return steps if self.time_attr == "steps" else steps * self.base.tokens_per_step()


# --- checks ------------------------------------------------------------------------------------


def resolve_path(path: str) -> str | None:
    """None if `path` names a train spec field (or a key under a free-form mapping); else a message."""
    if path in FROZEN_PATHS:
        return f"{path!r} names the run, not a hyperparameter; it cannot be searched"
    cur: Any = TrainSpec
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = getattr(cur, "model_fields", None)
        if fields is None:
            break
        if part not in fields:
            where = ".".join(parts[:i])
            hint = did_you_mean(part, list(fields))
            return (f"{path!r} is not a train spec path: {where + '.' if where else ''}{part} does not "
                    f"exist{hint or ' (allowed: ' + ', '.join(fields) + ')'}")
        ann = fields[part].annotation
        if isinstance(ann, type) and issubclass(ann, Strict):
            cur = ann
            if i == len(parts) - 1:
                return f"{path!r} is a section; search one of its keys (e.g. {path}.{next(iter(ann.model_fields))})"
        else:  # a leaf, or a free-form mapping (model.kwargs, deepspeed.extra, resources.custom)
            if i < len(parts) - 1 and "dict" not in str(ann):
                return f"{path!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
            break
    return None


def trial_data(spec: SweepSpec, params: dict[str, Any], name: str, storage_path: str) -> dict[str, Any]:
    """A trial's train spec data: the base spec with `params` applied by dotted path.

    The trial gets its own name and storage, and (fixed_global_batch) the grad_accum that keeps the
    base's global batch.

    Python-mode data: values from secret-looking variables stay `EnvSecret`s, so the trial's own
    files still say `${VAR}`. Raises ValueError if the global batch cannot be kept.
    """
    data = paths.with_values(spec.base.model_dump(), params)
    data["name"] = name
    data["storage"] = {"path": storage_path}
    if spec.fixed_global_batch:
        glob = spec.base.global_batch()
        per = data["train"]["micro_batch_size"] * data["resources"]["workers"]
        if per <= 0 or glob % per:
            raise ValueError(f"fixed_global_batch: global batch {glob} is not a multiple of micro_batch_size "
                             f"x workers = {per}")
        data["train"]["grad_accum"] = glob // per
    return data


def trial_spec(spec: SweepSpec, params: dict[str, Any], name: str, storage_path: str) -> TrainSpec:
    """The validated train spec of one trial (see `trial_data`).

    Raises:
        ValueError: the sampled combination is not a valid train spec (message: the first error).
    """
    try:
        return TrainSpec.model_validate(trial_data(spec, params, name, storage_path))
    except ValidationError as e:  # e.g. a sampled combination the single-value checks could not see
        raise ValueError(f"trial spec is invalid: {first_error(e)}") from None


def check_search(spec: SweepSpec) -> list[tuple[str, tuple[str | int, ...], str]]:
    """(search key, sub path, message) for every search axis that cannot work.

    Checks the path exists, the distribution suits the algorithm, and every listed value (or range
    bound) passes the train spec's own validation.
    """
    out: list[tuple[str, tuple[str | int, ...], str]] = []
    for key, dist in spec.search.items():
        problem = resolve_path(key)
        if problem:
            out.append((key, (), problem))
            continue
        if spec.algorithm == "grid" and dist.kind in ("uniform", "loguniform", "randint"):
            out.append((key, (dist.kind,), f"algorithm grid takes grid, choice or constant values, not "
                        f"{dist.kind}; use algorithm random or optuna"))
            continue
        if spec.algorithm == "optuna" and dist.kind == "grid":
            out.append((key, ("grid",), "Optuna cannot search a grid axis; use choice, or algorithm grid"))
            continue
        if spec.fixed_global_batch and key == "train.micro_batch_size" and dist.kind in ("uniform", "randint"):
            out.append((key, (dist.kind,), "fixed_global_batch needs listed batch sizes (choice or grid)"))
            continue
        if spec.fixed_global_batch and key == "train.grad_accum":
            out.append((key, (), "fixed_global_batch sets train.grad_accum itself; do not search it"))
            continue
        for i, value in enumerate(dist.probe_values()):
            try:
                TrainSpec.model_validate(trial_data(spec, {key: value}, "probe", spec.storage.path))
            except (ValidationError, ValueError) as e:
                why = first_error(e) if isinstance(e, ValidationError) else str(e)
                sub: tuple[str | int, ...] = (dist.kind, i) if dist.kind != "value" else ()
                out.append((key, sub, f"value {value!r} fails the train spec's validation: {why}"))
                break
    return out


def check_budget(spec: SweepSpec) -> list[tuple[str, str]]:
    """(field, message) for trial counts and ASHA settings that contradict each other."""
    out = []
    g = spec.grid_size()
    if spec.num_samples is not None and g > spec.num_samples:
        out.append(("num_samples", f"the grid has {g} points but num_samples={spec.num_samples}; raise "
                    f"num_samples to at least {g} or shrink the grid"))
    if spec.algorithm == "grid" and spec.num_samples is None and g > 10_000:
        out.append(("search", f"the grid has {g} points (more than 10000)"))
    if spec.scheduler == "asha" and spec.grace_period > spec.horizon():
        out.append(("grace_period", f"grace_period={spec.grace_period} exceeds max_t={spec.horizon()} "
                    f"({spec.time_attr})"))
    return out


EVAL_PREFIX = "eval."
TRAIN_METRICS = ("loss", "val_loss", "lr", "step_time_s", "tokens_per_s", "tokens", "samples", "peak_mem_bytes",
                 "data_wait_frac")
"""What every training run reports (`raybig.train.loop`): at log steps, and val_loss at evaluations."""
TASK_METRICS = {"classification": ("accuracy",), "masked_lm": ("masked_accuracy",)}
"""Named metrics a task reports beside the loss (and as `val_<name>` beside val_loss)."""


def eval_metric_name(flat_key: str) -> str:
    """`EvalReport.flat()`'s key (`eval/perplexity`, `eval/<task>/<metric>`) as a sweep metric name (dots)."""
    return EVAL_PREFIX + flat_key.removeprefix("eval/").replace("/", ".")


def eval_metric_names(base: TrainSpec) -> list[str]:
    """The `eval.` results the base spec's `eval:` section yields at the end of training (none without one).

    Perplexity of a causal LM: eval.mean_nll, eval.perplexity, eval.bits_per_byte; of a classifier:
    eval.val_loss, eval.val_accuracy (whole validation split); of a masked LM: eval.val_loss,
    eval.perplexity, eval.masked_accuracy (the run's masked validation batches). Each lm-eval task: eval.<task>.<metric>
    and eval.<task>.<metric>_stderr for every metric of its `metric_list`.
    """
    e = base.eval
    if e is None or not e.at_end:
        return []
    out: list[str] = []
    if e.perplexity:
        keys = {"classification": ("val_loss", "val_accuracy"),
                "masked_lm": ("val_loss", "perplexity", "masked_accuracy")}.get(
            base.task, ("mean_nll", "perplexity", "bits_per_byte"))
        out += [EVAL_PREFIX + k for k in keys]
    if e.tasks:
        from raybig.spec.eval_tasks import load_task_config

        for t in e.tasks:
            cfg = load_task_config(t)
            for m in cfg.get("metric_list") or []:
                name = m.get("metric") if isinstance(m, dict) else None
                if isinstance(name, str):
                    out += [f"{EVAL_PREFIX}{cfg['task']}.{name}", f"{EVAL_PREFIX}{cfg['task']}.{name}_stderr"]
    return out


def metric_names(base: TrainSpec) -> list[str]:
    """Every metric name a sweep over `base` can optimise: training's reports and `eval_metric_names`."""
    extra = TASK_METRICS.get(base.task, ())
    names = [*TRAIN_METRICS, *extra, *(f"val_{m}" for m in extra)]
    if base.distill is not None:
        names.append("distill_loss")
    return names + eval_metric_names(base)


def check_metric(spec: SweepSpec) -> str | None:
    """None if the base spec produces `spec.metric` (and the scheduler can use it); else the message.

    A plug-in model (`model.target`) may report metrics of its own names: any non-`eval.` name passes.
    """
    name, base = spec.metric, spec.base
    names = metric_names(base)
    if name not in names and not (base.model.target is not None and not name.startswith(EVAL_PREFIX)):
        if name.startswith(EVAL_PREFIX) and (base.eval is None or not base.eval.at_end):
            return (f"{name!r} is an end-of-training evaluation result, but the base spec has no eval: section "
                    "that runs at the end (add e.g. `eval: {perplexity: true}` to the base)")
        return (f"{name!r} is not a metric the base spec produces{did_you_mean(name, names)} "
                f"(it produces: {', '.join(names)})")
    if spec.metric_is_eval() and spec.scheduler == "asha":
        return (f"{name!r} is measured once, after training, but ASHA compares trials while they train; "
                "set scheduler: none (or optimise a training metric such as val_loss)")
    return None
