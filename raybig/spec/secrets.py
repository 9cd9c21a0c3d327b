"""Values that came from secret-looking `${VAR}` references, and how specs keep them secret.

A spec value interpolated from an environment variable whose name looks secret (`HUB_TOKEN`,
`DB_PASSWORD`, ...) becomes an `EnvSecret`: a `str` holding the real value, which in-process code
uses as any string, that also remembers the `${VAR}` text it came from. Every JSON-mode dump of a
spec (`freeze`, `spec_hash`, `model_dump(mode="json")`) writes that text back instead of the value,
so no file, hash, job environment or Ray job info ever holds the secret. The origin travels inside
the value, so no copy (python dump -> validate, `model_copy`, dotted-path edits) can drop it.

Pydantic turns a `str` subclass into a plain `str` when it validates a `str` field, so the spec
base class (`Strict`) puts the instances back after validation (`restore`) and writes templates
in JSON mode (`to_json`); these two functions are the only machinery, used by every spec model.
"""

from __future__ import annotations

import re
from typing import Any

# Env vars whose values must never be written back into a frozen spec.
SECRET_NAME_RE = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """True if the environment variable `name` looks like it holds a secret."""
    return bool(SECRET_NAME_RE.search(name))


class EnvSecret(str):
    """A string value read from secret-looking environment variables.

    Args:
        value: the real (interpolated) text; what `str` operations see.
        names: the secret-looking variable names it used, e.g. `("HUB_TOKEN",)`.
        template: the text as written in the spec, e.g. `"${HUB_TOKEN}"`; what dumps write.

    `repr()` shows the template, so a spec or an error message printed with `!r` shows
    `'${HUB_TOKEN}'`, not the value.
    """

    names: tuple[str, ...]
    template: str

    def __new__(cls, value: str, names: tuple[str, ...], template: str) -> EnvSecret:
        """See the class docstring."""
        obj = super().__new__(cls, value)
        obj.names = tuple(names)
        obj.template = template
        return obj

    def __repr__(self) -> str:
        return repr(self.template)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle (Ray ships specs to workers) and deepcopy keep the type and its origin.
        return (EnvSecret, (str(self), self.names, self.template))


def find_secret(value: Any) -> EnvSecret | None:
    """The first EnvSecret inside `value` (plain containers only, not models); None if none."""
    if isinstance(value, EnvSecret):
        return value
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return None
    for v in items:
        found = find_secret(v)
        if found is not None:
            return found
    return None


class NotText(ValueError):
    """A secret-sourced value reached a field that is not text (it would lose its origin)."""

    def __init__(self, path: tuple[Any, ...], secret: EnvSecret):
        self.path = path
        names = ", ".join(f"${{{n}}}" for n in secret.names)
        super().__init__(f"comes from {names} (a secret-looking variable), which can only fill a text "
                         f"field; a number or flag would be written into files in clear")


def restore(inp: Any, out: Any, path: tuple[Any, ...] = ()) -> Any:
    """`out` (a validated value) with EnvSecret instances from `inp` (its input) put back.

    Walks dicts and lists in step; stops at pydantic models (each restores its own fields).
    Raises NotText where an EnvSecret was turned into something other than a string.
    """
    from pydantic import BaseModel

    if isinstance(out, BaseModel):
        return out
    if isinstance(inp, EnvSecret):
        if isinstance(out, EnvSecret):
            return out
        if isinstance(out, str):
            # A validator may have normalised the text; it keeps its origin all the same.
            return inp if out == str(inp) else EnvSecret(out, inp.names, inp.template)
        raise NotText(path, inp)
    if isinstance(inp, dict) and isinstance(out, dict):
        changed = {k: restore(inp[k], v, (*path, k)) for k, v in out.items() if k in inp}
        if any(changed[k] is not out[k] for k in changed):
            return {k: changed.get(k, v) for k, v in out.items()}
        return out
    if isinstance(inp, list | tuple) and isinstance(out, list | tuple) and len(inp) == len(out):
        items = [restore(i, o, (*path, n)) for n, (i, o) in enumerate(zip(inp, out, strict=True))]
        if any(a is not b for a, b in zip(items, out, strict=True)):
            return type(out)(items)
        return out
    if find_secret(inp) is not None:  # e.g. a list of secrets validated into a number
        raise NotText(path, find_secret(inp))  # type: ignore[arg-type]
    return out


def to_json(value: Any, dumped: Any) -> Any:
    """`dumped` (a JSON-mode dump of `value`) with every EnvSecret written as its template."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return dumped
    if isinstance(value, EnvSecret):
        return value.template
    if isinstance(value, dict) and isinstance(dumped, dict):
        return {k: to_json(value[k], v) if k in value else v for k, v in dumped.items()}
    if isinstance(value, list | tuple) and isinstance(dumped, list) and len(value) == len(dumped):
        return [to_json(v, d) for v, d in zip(value, dumped, strict=True)]
    return dumped


def to_python(value: Any, dumped: Any) -> Any:
    """`dumped` (a python-mode dump of `value`) with EnvSecret instances kept (pydantic drops them)."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return dumped
    if isinstance(value, EnvSecret):
        return value
    if isinstance(value, dict) and isinstance(dumped, dict):
        return {k: to_python(value[k], v) if k in value else v for k, v in dumped.items()}
    if isinstance(value, list | tuple) and isinstance(dumped, list | tuple) and len(value) == len(dumped):
        return type(dumped)(to_python(v, d) for v, d in zip(value, dumped, strict=True))
    return dumped


def redact(message: str, secrets: set[str]) -> str:
    """`message` with every secret value (and prefix of 8+ characters) replaced by '***'.

    An error message may hold a value cut to some length; every such prefix is scrubbed too.
    """
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) < 4:
            continue  # too short to find without mangling ordinary words
        for k in range(len(secret), min(8, len(secret)) - 1, -1):
            if secret[:k] in message:  # longest first; a message may hold it cut to several lengths
                message = message.replace(secret[:k], "***")
    return message
