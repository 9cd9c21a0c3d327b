"""The one dotted-path editor: `--set a.b=c`, sweep search keys and pipeline `set:` all use it.

Paths are dotted (`train.lr`, `resources.custom.x`); a segment of ASCII digits indexes a list.
Edits happen on plain data (what a spec is validated from); `edit()` re-validates a spec with
edits applied, keeping every value's type (including secret-sourced values, see `secrets`).
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from pydantic import BaseModel

from raybig.errors import Path, dotted_path

MAX_DEPTH = 64


class PathError(ValueError):
    """A dotted path cannot be applied to the data.

    Args:
        path: the prefix of the path where it failed (for error locations).
        message: what is wrong, without the path.
    """

    def __init__(self, path: Path, message: str):
        self.path = path
        self.message = message
        super().__init__(message)


def parse_path(key: str | Path) -> Path:
    """`"a.b.0"` -> `("a", "b", 0)`. Raises PathError for empty segments or too deep a path."""
    if isinstance(key, tuple):
        return key
    if key.count(".") >= MAX_DEPTH:
        raise PathError((), f"nested deeper than {MAX_DEPTH} levels")
    parts: list[str | int] = []
    for p in key.strip().split("."):
        if not p:
            raise PathError(tuple(parts), "empty key segment")
        # ASCII digits only: str.isdigit() is also true for '²', which int() refuses.
        parts.append(int(p) if p.isascii() and p.isdigit() and len(p) < 10 else p)
    return tuple(parts)


def set_path(data: Any, key: str | Path, value: Any, *, create: bool = True) -> Path:
    """Set `value` at the dotted `key` inside `data` (dicts and lists), in place.

    Args:
        data: nested dicts/lists (a spec's plain data).
        key: a dotted path or a parsed one.
        value: stored as is.
        create: make missing (or null) sections as empty mappings; if False a missing section is
            an error.

    Returns:
        The path as applied: segments that index a mapping are strings (`x.0` sets key "0").

    Raises:
        PathError: a section is missing (create=False), or the path runs into a value.
    """
    path = parse_path(key)
    done: list[str | int] = []
    node = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, dict):
            k: str | int = str(part)
            if last:
                node[k] = value
            else:
                nxt = node.get(k)
                if nxt is None or (not create and not isinstance(nxt, dict | list)):
                    if not create:
                        raise PathError((*done, k), f"no section {k!r}")
                    nxt = node[k] = {}
                node = nxt
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            k = part
            if last:
                node[k] = value
            else:
                node = node[k]
        else:
            what = "set a key on" if last else "descend into"
            raise PathError(tuple(done), f"cannot {what} {type(node).__name__}")
        done.append(k)
    return tuple(done)


def with_values(data: dict[str, Any], values: dict[str, Any], *, create: bool = True) -> dict[str, Any]:
    """A deep copy of `data` with every `{dotted path: value}` set (see `set_path`)."""
    out = copy.deepcopy(data)
    for key, value in values.items():
        set_path(out, key, value, create=create)
    return out


M = TypeVar("M", bound=BaseModel)


def edit(spec: M, values: dict[str, Any], *, create: bool = True) -> M:
    """`spec` re-validated with `{dotted path: value}` applied; same class as `spec`.

    The spec is dumped in python mode, so values from secret-looking variables keep their origin.
    Raises PathError (bad path) or pydantic.ValidationError (the result is not a valid spec).
    """
    return type(spec).model_validate(with_values(spec.model_dump(), values, create=create))


__all__ = ["PathError", "dotted_path", "edit", "parse_path", "set_path", "with_values"]
