"""What every spec model shares: strictness, secret-keeping, names, byte sizes, the queued base.

Error messages that start with "@sub.path: " are re-anchored to that sub path by the loader
(`raybig.spec.issues`), so a cross-field contradiction names the key the user wrote rather than
its parent; `at()` builds them.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidatorFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from raybig.errors import dotted_path
from raybig.spec import secrets


def at(field: str, message: str) -> ValueError:
    """A validation error re-anchored to `field` (a dotted sub path of the model raising it)."""
    return ValueError(f"@{field}: {message}")


def local_abs(path: str) -> str:
    """A local path made absolute (`~` expanded), so Ray workers need not share the driver's cwd; a URI as is."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class Strict(BaseModel):
    """Base of every spec model: unknown keys, NaN and inf refused; frozen; secrets kept.

    Values that came from secret-looking `${VAR}`s (`secrets.EnvSecret`) survive validation in any
    text field and are written as their `${VAR}` template by every JSON-mode dump.
    """

    # allow_inf_nan=False: YAML's .nan/.inf pass every ge/le bound check, so refuse them outright.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)
    # Fields a base class declares that read better at the end of a dumped spec.
    _dump_last: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="wrap")
    @classmethod
    def _keep_secrets(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Pydantic turns a str subclass into a plain str; put the EnvSecret instances back.
        model = handler(data)
        if isinstance(data, dict) and isinstance(model, BaseModel) and secrets.find_secret(data) is not None:
            for name in type(model).model_fields:
                if name not in data:
                    continue
                old = model.__dict__[name]
                try:
                    new = secrets.restore(data[name], old, (name,))
                except secrets.NotText as e:
                    raise at(dotted_path(e.path), str(e)) from None
                if new is not old:
                    model.__dict__[name] = new  # frozen model: set the slot itself, once, here
        return model

    @model_serializer(mode="wrap")
    def _dump_secrets(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        out = handler(self)
        if not isinstance(out, dict):
            return out
        fix = secrets.to_json if info.mode_is_json() else secrets.to_python
        for name in out:
            if name in type(self).model_fields:
                out[name] = fix(self.__dict__[name], out[name])
        for name in self._dump_last:
            if name in out:
                out[name] = out.pop(name)
        return out


def _not_secret_name(v: Any) -> Any:
    if isinstance(v, secrets.EnvSecret):
        names = ", ".join(f"${{{n}}}" for n in v.names)
        raise ValueError(f"comes from {names} (a secret-looking variable); a name is written into paths, "
                         f"job ids and logs, so it cannot hold a secret")
    return v


Name = Annotated[str, BeforeValidator(_not_secret_name)]
"""A run, job, sweep, app or pipeline name: also a directory name, so never a secret."""


# --- byte sizes --------------------------------------------------------------------------------

MAX_BYTES = 2**60  # 1 EiB: anything larger is a typo, and Ray would wait forever to reserve it
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
# Units we accept (case-insensitive): ByteSize's, plus the Kubernetes-style Ki/Mi/Gi/Ti.
_UNITS = {"", "b", "k", "kb", "m", "mb", "g", "gb", "t", "tb", "ki", "kib", "mi", "mib", "gi", "gib",
          "ti", "tib"}


def _size_input(v: Any) -> Any:
    """Type and spelling checks before ByteSize parses, so errors name the fix."""
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError("expected a size such as '8GiB' or a number of bytes")
    if isinstance(v, int | float):
        # NaN fails every comparison, so test for the good range rather than the bad one.
        if not v > 0:
            raise ValueError("must be positive")
        if not v <= MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes (1 EiB)")
    if isinstance(v, str):
        m = _SIZE_RE.match(v) if len(v) <= 64 else None
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{v[:40]!r} is not a size; use e.g. '8GiB', '512MB' or bytes")
        unit = m.group(2)
        if unit.lower() in ("ki", "mi", "gi", "ti"):
            unit += "B"  # ByteSize spells binary units KiB, MiB, ...
        return f"{m.group(1)}{unit or 'B'}"
    return v


def _size_range(v: int) -> int:
    if not 0 < v <= MAX_BYTES:
        raise ValueError("must be positive" if v <= 0 else f"larger than {MAX_BYTES} bytes (1 EiB)")
    return int(v)  # a plain int: Ray and json see what they always saw


Bytes = Annotated[ByteSize, BeforeValidator(_size_input), AfterValidator(_size_range)]
"""A size in bytes: an integer, or text such as '8GiB', '512MB', '1.5G' (pydantic's ByteSize;
K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti and KiB/... powers of 1024); at most 1 EiB."""


# --- the queued kinds --------------------------------------------------------------------------


class QueuedSpec(Strict):
    """Base of the kinds the scheduler queues (train, sweep, probe, pipeline)."""

    _dump_last: ClassVar[tuple[str, ...]] = ("preemptible", "priority", "max_retries")

    preemptible: bool | None = Field(None, description=(
        "May the scheduler checkpoint and stop this job to make room for one of higher priority (it "
        "resumes from that checkpoint when admitted again)? Unset: the kind's default (train: yes; "
        "sweep, probe, pipeline: no)."))
    priority: int = Field(0, ge=-1000, le=1000, description="Scheduler priority (higher runs first).")
    max_retries: int = Field(0, ge=0, le=100, description="Scheduler retries of a failed job.")

    def is_preemptible(self) -> bool:
        """`preemptible`, or the kind's default when unset (only train jobs yield by default)."""
        return self.preemptible if self.preemptible is not None else getattr(self, "kind", "") == "train"
