"""Load, validate and freeze job specs.

`load_spec(path, overrides)` is the only way in: it returns one typed `JobSpec` or raises
`SpecError` holding every problem found, each with its YAML path and line.

This package is a leaf: it imports nothing from raybig but `errors` and `tokenizer`, and never
torch, so `raybig validate` stays fast (a test checks `torch` stays out of `sys.modules`).
"""

from __future__ import annotations

import hashlib
import json

import yaml
from pydantic import BaseModel, ValidationError

from raybig.errors import Issue, SpecError
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
    "freeze",
    "load_spec",
    "load_spec_text",
    "spec_hash",
    "validate_data",
]


def load_spec(path: str, overrides: list[str] | None = None, env: dict[str, str] | None = None,
              resolve_secrets: bool = True) -> JobSpec:
    """Read, interpolate, override and validate a spec file (local path or fsspec URI).

    Args:
        path: the YAML file.
        overrides: `--set` items, `dotted.path=value` (values read as YAML).
        env: variables for `${VAR}` (default: os.environ).
        resolve_secrets: False keeps secret-looking `${VAR}`s as text (re-reading a frozen file
            whose secrets are not needed, e.g. for a report).

    Raises:
        SpecError: every problem found, each with file, line and dotted path.
    """
    loaded = load_yaml_file(path, env=env, resolve_secrets=resolve_secrets)
    apply_overrides(loaded, overrides or [])
    return validate_data(loaded)


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
                                       context={"source": loaded.source, "loaded": loaded})
    except ValidationError as e:
        # loc starts with the union's tag (the kind); strip it so paths read as the user wrote them.
        issues = issues_from(e, KINDS[kind], loaded.line_of, loaded.source, strip=1)
    except SpecError as e:  # raised by validators that report several issues at once (sweep)
        issues = e.issues
    # A value from a secret env var that fails validation must not be echoed to the terminal or a log.
    for issue in issues:
        issue.message = redact(issue.message, loaded.secret_values)
    raise SpecError(issues)


def freeze(spec: BaseModel) -> str:
    """The resolved spec as YAML; values from secret-looking variables written as `${VAR}`."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def spec_hash(spec: BaseModel) -> str:
    """Stable content hash of the resolved spec (first 12 hex chars of sha256).

    Computed over the JSON-mode dump, so a secret contributes its `${VAR}` text, not its value.
    """
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
