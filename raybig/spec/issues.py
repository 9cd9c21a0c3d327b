"""The one translator from pydantic's errors to raybig's `Issue`s (`file:line: path: message`).

Also `did_you_mean` (typos and names from other tools) and `first_error` (one line for a nested
validation, e.g. a sweep value checked against the train spec).
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from raybig.errors import Issue, Path, dotted_path

# Names users bring from other tools -> our field, so "did you mean" can bridge them.
ALIASES = {"learning_rate": "lr", "batch_size": "micro_batch_size", "micro_batch": "micro_batch_size",
           "gradient_accumulation_steps": "grad_accum", "num_workers": "workers", "stage": "zero_stage",
           "max_steps": "steps", "warmup": "warmup_steps", "epochs": "steps", "zero": "zero_stage"}


def did_you_mean(word: str, candidates: list[str]) -> str:
    """`"; did you mean 'x'?"` for the closest candidate (or alias of one), else `""`."""
    pool = {c: c for c in candidates}
    pool.update({a: f for a, f in ALIASES.items() if f in candidates})
    close = difflib.get_close_matches(word, list(pool), n=1, cutoff=0.6)
    return f"; did you mean {pool[close[0]]!r}?" if close else ""


def _anchor(loc: Path, msg: str) -> tuple[Path, str]:
    """Strip pydantic's "Value error, " and re-anchor "@sub.path: message" (see base.at)."""
    msg = msg.removeprefix("Value error, ")
    if msg.startswith("@"):
        sub, _, msg = msg[1:].partition(": ")
        loc = loc + tuple(int(p) if p.isdigit() else p for p in sub.split("."))
    return loc, msg


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def issues_from(err: ValidationError, model: type[BaseModel], line_of: Any = None, source: str = "",
                strip: int = 0) -> list[Issue]:
    """Every error of `err` as an Issue, sorted by line.

    Args:
        err: raised validating `model`.
        model: the spec class validated (for the keys allowed where an unknown key was found).
        line_of: `path -> line or None` (a `Loaded.line_of`); None leaves lines empty.
        source: the file name to show.
        strip: leading loc items to drop (1 for a discriminated union's tag).
    """
    issues = []
    for e in err.errors(include_url=False):
        loc, msg = _anchor(tuple(e["loc"])[strip:], e["msg"])
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            allowed = list(parent.model_fields) if parent else []
            hint = did_you_mean(str(loc[-1]), allowed)
            msg = f"unknown key {loc[-1]!r}{hint}"
            if not hint and allowed:
                msg += f" (allowed: {', '.join(allowed)})"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {_short(e['input'])})"
        issues.append(Issue(loc, msg, line_of(loc) if line_of else None, source))
    issues.sort(key=lambda i: (i.line if i.line is not None else 10**9, dotted_path(i.path)))
    return issues


def first_error_parts(err: ValidationError) -> tuple[str, str]:
    """The first error of `err` as (dotted path or "", message)."""
    e = err.errors(include_url=False)[0]
    loc, msg = _anchor(tuple(e["loc"]), e["msg"])
    return ".".join(str(p) for p in loc), msg


def first_error(err: ValidationError) -> str:
    """The first error of `err` as `dotted.path: message` (or just the message at the root)."""
    where, msg = first_error_parts(err)
    return f"{where}: {msg}" if where else msg


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
