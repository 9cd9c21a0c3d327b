"""Load, validate and freeze job specs.

`load_spec(path, overrides)` is the only way in: it returns one typed `JobSpec` or raises
`SpecError` holding every problem found, each with its YAML path and line.

This package is a leaf: it imports nothing from raybig but `errors` and `tokenizer`, and never
torch, so `raybig validate` stays fast (a test checks `torch` stays out of `sys.modules`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raybig.errors import Issue, SpecError, dotted_path
from raybig.spec.base import QueuedSpec
from raybig.spec.issues import did_you_mean, issues_from
from raybig.spec.job import ADAPTER, KINDS, JobSpec
from raybig.spec.models import TrainSpec
from raybig.spec.pipeline import PipelineSpec
from raybig.spec.probe import ProbeSpec
from raybig.spec.secrets import EnvSecret, redact
from raybig.spec.serve import ServeSpec
from raybig.spec.sweep import SweepSpec
from raybig.spec.yaml_io import Loaded, apply_overrides, load_yaml_file, load_yaml_text

__all__ = [
    "EnvSecret",
    "Issue",
    "JobSpec",
    "KINDS",
    "PipelineSpec",
    "ProbeSpec",
    "QueuedSpec",
    "ServeSpec",
    "SpecError",
    "SweepSpec",
    "TrainSpec",
    "changed_paths",
    "freeze",
    "load_spec",
    "load_spec_text",
    "spec_hash",
    "validate_data",
]


# A check run on a validated spec: (path as the user wrote it, message) for every problem it finds.
SpecCheck = Callable[[Any], list[tuple[tuple[str | int, ...], str]]]


def load_spec(path: str, overrides: list[str] | None = None, env: dict[str, str] | None = None,
              resolve_secrets: bool = True, checks: Sequence[SpecCheck] = ()) -> JobSpec:
    """Read, interpolate, override and validate a spec file (local path or fsspec URI).

    Args:
        path: the YAML file.
        overrides: `--set` items, `dotted.path=value` (values read as YAML).
        env: variables for `${VAR}` (default: os.environ).
        resolve_secrets: False keeps secret-looking `${VAR}`s as text (re-reading a frozen file
            whose secrets are not needed, e.g. for a report).
        checks: more checks of the validated spec, each giving (path, message) pairs that become
            issues with this file's lines (the CLI passes `raybig.plugins.target_problems`: a
            `model.target` whose module, factory or kwargs do not exist; a cluster driver or
            worker re-reading a spec does not).

    Raises:
        SpecError: every problem found, each with file, line and dotted path.
    """
    loaded = load_yaml_file(path, env=env, resolve_secrets=resolve_secrets)
    apply_overrides(loaded, overrides or [])
    spec = validate_data(loaded)
    issues = [Issue(p, msg, loaded.line_of(p), loaded.source) for check in checks for p, msg in check(spec)]
    if issues:
        raise SpecError(issues)
    return spec


def load_spec_text(text: str, source: str = "<spec>", overrides: list[str] | None = None,
                   env: dict[str, str] | None = None, resolve_secrets: bool = True) -> JobSpec:
    """`load_spec` for YAML text; `source` names it in issues. Raises SpecError."""
    loaded = load_yaml_text(text, source=source, env=env, resolve_secrets=resolve_secrets)
    apply_overrides(loaded, overrides or [])
    return validate_data(loaded)


def validate_data(loaded: Loaded) -> JobSpec:
    """Validate loaded data as the kind it names (default `train`). Raises SpecError."""
    data = loaded.data
    kind = data.get("kind", "train")
    if not isinstance(kind, str) or kind not in KINDS:
        hint = did_you_mean(str(kind), list(KINDS))
        raise SpecError([Issue(("kind",), f"unknown kind {kind!r}; expected one of "
                               f"{', '.join(sorted(KINDS))}{hint}", loaded.line_of(("kind",)),
                               loaded.source)])
    try:
        # context: kinds that reference other files (a sweep's base) resolve them beside this one.
        return ADAPTER.validate_python({**data, "kind": kind},
                                       context={"source": loaded.source, "loaded": loaded, "load_spec": load_spec})
    except ValidationError as e:
        # loc starts with the union's tag (the kind); strip it so paths read as the user wrote them.
        issues = issues_from(e, KINDS[kind], loaded.line_of, loaded.source, strip=1)
        issues += _cross_field_issues(loaded, kind, issues, _droppable(e))
    except SpecError as e:  # raised by validators that report several issues at once (sweep)
        issues = e.issues
    issues.sort(key=lambda i: (i.line if i.line is not None else 10**9, dotted_path(i.path)))
    # A value from a secret env var that fails validation must not be echoed to the terminal or a log.
    for issue in issues:
        issue.message = redact(issue.message, loaded.secret_values)
    raise SpecError(issues)


def _drop(data: Any, path: tuple[str | int, ...]) -> bool:
    """Delete `path` from nested dicts (a list element: the key holding the list); False if absent."""
    cur, holder, key = data, None, None
    for p in path:
        if isinstance(cur, dict) and p in cur:
            holder, key, cur = cur, p, cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and 0 <= p < len(cur):
            cur = cur[p]  # keep `holder`/`key`: the list itself is dropped
        else:
            break
    if holder is None:
        return False
    del holder[key]
    return True


def _copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_copy(v) for v in d]
    return d  # leaves (EnvSecret included) are shared, never mutated


def _related(a: tuple[str | int, ...], b: tuple[str | int, ...]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


# Error types that are a validator's verdict (or a missing key), not about a key's own value: such a
# key is kept, since dropping it could change what the rest of the spec means (model.hf, a preset).
# Other errors (an unknown key, a wrong type, out of range) are dropped, their defaults standing in.
_VERDICT_ERRORS = ("value_error", "assertion_error", "missing")


def _droppable(err: ValidationError) -> list[tuple[str | int, ...]]:
    """Paths (as the user wrote them) whose error is about the key's own value or an unknown key."""
    from raybig.spec.issues import _anchor

    out = []
    for e in err.errors(include_url=False):
        if e["type"] in _VERDICT_ERRORS:
            continue
        loc, _ = _anchor(tuple(e["loc"])[1:], e["msg"])
        out.append(loc)
    return out


def _cross_field_issues(loaded: Loaded, kind: str, issues: list[Issue],
                        droppable: list[tuple[str | int, ...]]) -> list[Issue]:
    """Cross-field problems pydantic did not get to because a field failed first.

    A model's cross-field checks run only once all its fields are valid, so a spec with a typo and a
    contradiction would be reported in two rounds. Keys whose own value failed (an unknown key, a
    wrong type, out of range) are dropped, their defaults standing in, and the spec validated
    again; new issues away from the dropped keys (and not naming them) are the contradictions that
    were waiting behind them.
    """
    data = _copy(loaded.data)
    dropped: list[tuple[str | int, ...]] = []
    seen = {(i.path, i.message) for i in issues}
    extra: list[Issue] = []
    todo = droppable
    for _ in range(3):
        progressed = False
        for path in todo:
            if path and path[0] not in ("name", "kind") and _drop(data, path):
                dropped.append(path)
                progressed = True
        if not progressed:
            break
        todo = []
        try:
            ADAPTER.validate_python({**data, "kind": kind}, context={"source": loaded.source, "loaded": loaded})
            break
        except ValidationError as e:
            found = issues_from(e, KINDS[kind], loaded.line_of, loaded.source, strip=1)
            todo = _droppable(e)
        except SpecError as e:
            found = e.issues
        names = [dotted_path(d) for d in dropped]
        for issue in found:
            if any(_related(issue.path, d) for d in dropped) or any(n in issue.message for n in names):
                continue  # about a key we removed, or an artifact of its default
            if (issue.path, issue.message) not in seen:
                seen.add((issue.path, issue.message))
                extra.append(issue)
    return extra


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def changed_paths(old: Any, new: Any) -> list[str]:
    """Dotted paths (sorted) whose value differs between two JSON-mode spec dumps (mappings nest)."""
    a, b = _flat(old), _flat(new)
    return sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))


def freeze(spec: BaseModel) -> str:
    """The resolved spec as YAML; values from secret-looking variables written as `${VAR}`."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def spec_hash(spec: BaseModel) -> str:
    """Stable content hash of the resolved spec (first 12 hex chars of sha256).

    Computed over the JSON-mode dump, so a secret contributes its `${VAR}` text, not its value.
    """
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
