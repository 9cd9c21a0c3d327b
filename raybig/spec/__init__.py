"""Load, validate and freeze job specs.

`load_spec(path, overrides)` is the only way in: it returns one typed spec or raises
`SpecError` holding every problem found, each with its YAML path and line.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raybig.spec.models import KINDS, JobSpec, TrainSpec
from raybig.spec.yaml_io import (
    Issue,
    Loaded,
    Path,
    SpecError,
    apply_overrides,
    dotted_path,
    load_yaml_file,
    load_yaml_text,
    redact,
)

__all__ = [
    "JobSpec",
    "KINDS",
    "SpecError",
    "TrainSpec",
    "Issue",
    "load_spec",
    "load_spec_text",
    "validate_data",
    "freeze",
    "spec_hash",
]


def load_spec(path: str, overrides: list[str] | None = None, env: dict[str, str] | None = None) -> Any:
    """Read, interpolate, override and validate a spec file. Raises SpecError."""
    loaded = load_yaml_file(path, env=env)
    return _finish(loaded, overrides or [])


def load_spec_text(text: str, source: str = "<spec>", overrides: list[str] | None = None,
                   env: dict[str, str] | None = None) -> Any:
    loaded = load_yaml_text(text, source=source, env=env)
    return _finish(loaded, overrides or [])


def _finish(loaded: Loaded, overrides: list[str]) -> Any:
    apply_overrides(loaded, overrides)
    spec = validate_data(loaded)
    # Remember which values came from secret env vars so freeze() can keep them out of files.
    spec._secret_paths = dict(loaded.secret_paths)
    return spec


def validate_data(loaded: Loaded) -> Any:
    data = loaded.data
    kind = data.get("kind", "train")
    if not isinstance(kind, str) or kind not in KINDS:
        hint = _did_you_mean(str(kind), list(KINDS))
        raise SpecError([Issue(("kind",), f"unknown kind {kind!r}; expected one of "
                               f"{', '.join(sorted(KINDS))}{hint}", loaded.line_of(("kind",)),
                               loaded.source)])
    model = KINDS[kind]
    try:
        # context: kinds that reference other files (a sweep's base) resolve them beside this one.
        return model.model_validate(data, context={"source": loaded.source, "loaded": loaded})
    except ValidationError as e:
        issues = _issues_from(e, model, loaded)
    except SpecError as e:  # raised by validators that report several issues at once (sweep)
        issues = e.issues
    # A value from a secret env var that fails validation must not be echoed to the terminal or a log.
    for issue in issues:
        issue.message = redact(issue.message, loaded.secret_values)
    raise SpecError(issues)


def _issues_from(err: ValidationError, model: type[BaseModel], loaded: Loaded) -> list[Issue]:
    issues = []
    for e in err.errors(include_url=False):
        loc: Path = tuple(e["loc"])
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if msg.startswith("@"):  # re-anchor cross-field errors to the named sub path
            sub, _, msg = msg[1:].partition(": ")
            loc = loc + tuple(int(p) if p.isdigit() else p for p in sub.split("."))
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            allowed = list(parent.model_fields) if parent else []
            hint = _did_you_mean(str(loc[-1]), allowed)
            msg = f"unknown key {loc[-1]!r}{hint}"
            if not hint and allowed:
                msg += f" (allowed: {', '.join(allowed)})"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg += f" (got {_short(e['input'])})"
        issues.append(Issue(loc, msg, loaded.line_of(loc), loaded.source))
    issues.sort(key=lambda i: (i.line if i.line is not None else 10**9, dotted_path(i.path)))
    return issues


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# Names users bring from other tools -> our field, so "did you mean" can bridge them.
ALIASES = {"learning_rate": "lr", "batch_size": "micro_batch_size", "micro_batch": "micro_batch_size",
           "gradient_accumulation_steps": "grad_accum", "num_workers": "workers", "stage": "zero_stage",
           "max_steps": "steps", "warmup": "warmup_steps", "epochs": "steps", "zero": "zero_stage"}


def _did_you_mean(word: str, candidates: list[str]) -> str:
    pool = {c: c for c in candidates}
    pool.update({a: f for a, f in ALIASES.items() if f in candidates})
    close = difflib.get_close_matches(word, list(pool), n=1, cutoff=0.6)
    return f"; did you mean {pool[close[0]]!r}?" if close else ""


def _model_at(model: type[BaseModel], path: Path) -> type[BaseModel] | None:
    """Descend field annotations along `path` to the pydantic model that holds the last key."""
    cur: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        cur = _unwrap_model(cur.model_fields[part].annotation)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _unwrap_model(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, list, tuple, dict, typing.Annotated):
        for arg in typing.get_args(tp):
            found = _unwrap_model(arg)
            if isinstance(found, type) and issubclass(found, BaseModel):
                return found
        return None
    return tp


def freeze(spec: BaseModel) -> str:
    """The resolved spec as YAML, with secret-sourced values put back as `${VAR}` references."""
    data = spec.model_dump(mode="json")
    for path, original in getattr(spec, "_secret_paths", {}).items():
        node = data
        try:
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = original
        except (KeyError, IndexError, TypeError):
            pass
    return yaml.safe_dump(data, sort_keys=False)


def spec_hash(spec: BaseModel) -> str:
    """Stable content hash of the resolved spec (first 12 hex chars of sha256)."""
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# Kinds defined outside models.py register themselves here (one line each).
from raybig.scheduler.probe import ProbeSpec  # noqa: E402

KINDS.setdefault("probe", ProbeSpec)
from raybig.spec import pipeline as _pipeline_kind  # noqa: E402,F401  (registers kind: pipeline)
from raybig.spec import serve as _serve_kind  # noqa: E402,F401  (registers kind: serve)
from raybig.spec import sweep as _sweep_kind  # noqa: E402,F401  (registers kind: sweep)
