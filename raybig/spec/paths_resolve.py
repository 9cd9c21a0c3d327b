"""Relative paths in a spec resolve one way: against the directory the command runs in (cwd).

Every field that names a file or folder (`data.path`, `init_from`, `storage.path`, `--resume-from`,
`model.hf`/`model.hf_config`, a tokenizer file, a serve `checkpoint`, ...) is made absolute in the
driver before anything starts, because Ray Train v2 moves each worker into its own working
directory (a relative path read there finds nothing) and a cluster job runs in Ray's.

Why the working directory and not the spec file's folder: it is what a shell user means
(`ls corpus/*.txt` and `raybig run job.yaml` in the same folder agree; tab completion works), a
`--set data.path=...` or `--resume-from` typed on the command line has no spec folder to be
relative to, and `storage.path: ./runs` has always meant `./runs` here. (A sweep's `base:` names
another spec file, an include rather than an input, and stays relative to the sweep's file.)

URIs with a protocol (`s3://`, `gs://`, `file://`, `stdlib://`) are left as they are; `~` expands.
Fields that may also hold a name rather than a path (`model.hf` may be a Hugging Face model id,
`data.tokenizer` may be `bytes`) are treated as paths only when they start with `./`, `../`, `~`,
or exist relative to the working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from raybig.spec.secrets import EnvSecret

# (class name, field name) -> whether the field always names a path (False: only when it looks like one).
PATH_FIELDS: dict[tuple[str, str], bool] = {
    ("TrainSpec", "init_from"): True,
    ("DataSpec", "path"): True,
    ("DataSpec", "prepared_path"): True,
    ("DataSpec", "prepared"): True,
    ("DataSpec", "tokenizer"): False,
    ("DataSpec", "tokenizer_path"): True,
    ("StorageSpec", "path"): True,
    ("ModelSpec", "hf"): False,
    ("ModelSpec", "hf_config"): False,
    ("ModelSpec", "path"): True,
    ("TeacherSpec", "path"): True,
    ("TeacherSpec", "export"): True,
    ("ServeSpec", "checkpoint"): True,
}


@dataclass(frozen=True)
class Resolved:
    """One field that was relative: its dotted path, what the spec said, what it now says."""

    field: str
    given: str
    absolute: str


def is_relative_local(value: str) -> bool:
    """A local path that is not absolute (no `scheme://`, not `/...`)."""
    return bool(value) and "://" not in value and not os.path.isabs(os.path.expanduser(value))


def absolute(value: str, base: str | None = None) -> str:
    """`value` made absolute against `base` (default: the working directory); URIs unchanged."""
    if not is_relative_local(value):
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    return os.path.normpath(os.path.join(base or os.getcwd(), expanded))


def _looks_like_path(value: str, base: str) -> bool:
    return value.startswith(("./", "../", "~")) or os.path.exists(os.path.join(base, value))


def relative_fields(spec: BaseModel, base: str | None = None) -> list[Resolved]:
    """Every path field of `spec` (at any depth) that is relative, with its absolute form."""
    base = base or os.getcwd()
    found: list[Resolved] = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, BaseModel):
            cls = type(node).__name__
            for name in type(node).model_fields:
                value = getattr(node, name)
                sub = f"{path}.{name}" if path else name
                always = PATH_FIELDS.get((cls, name))
                if always is not None and not isinstance(value, EnvSecret):
                    for i, v in (enumerate(value) if isinstance(value, list) else [(None, value)]):
                        if not isinstance(v, str) or isinstance(v, EnvSecret) or not is_relative_local(v):
                            continue
                        if not always and not _looks_like_path(v, base):
                            continue
                        found.append(Resolved(sub if i is None else f"{sub}.{i}", v, absolute(v, base)))
                else:
                    visit(value, sub)
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                visit(v, f"{path}.{i}")
        elif isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, BaseModel | list | dict):
                    visit(v, f"{path}.{k}")

    visit(spec, "")
    return found


def resolve_paths(spec: Any, base: str | None = None) -> tuple[Any, list[Resolved]]:
    """`spec` with every relative path field absolute (against `base`, default cwd), and what changed.

    Only those strings change (a copy, not a re-validation: every other value keeps its type and
    identity); a spec with nothing relative is returned as it is.
    """
    changed = relative_fields(spec, base)
    for r in changed:
        spec = _replace(spec, r.field.split("."), r.absolute)
    return spec, changed


def _replace(node: Any, path: list[str], value: str) -> Any:
    """A copy of `node` with the value at `path` (attribute names, list indices) set to `value`."""
    head, rest = path[0], path[1:]
    if isinstance(node, BaseModel):
        new = value if not rest else _replace(getattr(node, head), rest, value)
        return node.model_copy(update={head: new})
    if isinstance(node, list | tuple):
        items = list(node)
        items[int(head)] = value if not rest else _replace(items[int(head)], rest, value)
        return type(node)(items) if isinstance(node, tuple) else items
    if isinstance(node, dict):
        return {**node, head: value if not rest else _replace(node[head], rest, value)}
    raise TypeError(f"cannot descend into {type(node).__name__} at {head!r}")


__all__ = ["PATH_FIELDS", "Resolved", "absolute", "is_relative_local", "relative_fields", "resolve_paths"]
