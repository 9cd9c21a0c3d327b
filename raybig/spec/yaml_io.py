"""YAML with line numbers, `${ENV}` interpolation and `--set a.b=c` overrides.

The loader walks PyYAML's node graph itself so that every value keeps the line
it came from. Aliases are expanded with a node budget, which refuses
billion-laughs documents instead of eating the machine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from raybig.errors import Issue, Path, SpecError, dotted_path, first_line  # noqa: F401  (re-exported)
from raybig.spec import paths
from raybig.spec.secrets import SECRET_NAME_RE, EnvSecret, is_secret_name, redact  # noqa: F401  (re-exported)

MAX_NODES = 100_000
MAX_DEPTH = 64
MAX_SPEC_CHARS = 1_000_000  # specs are a few KB; this bounds a /dev/zero or /proc "spec" (and a sweep's base)
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class Loaded:
    """Raw YAML data plus the line of every path.

    Values interpolated from secret-looking variables are `EnvSecret`s inside `data`.
    """

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    source: str = "<spec>"
    # The values of those env vars, so error messages can be scrubbed of them (see redact()).
    secret_values: set[str] = field(default_factory=set)

    def line_of(self, path: Path) -> int | None:
        """Line of `path`, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get(())


class _Walker:
    def __init__(self, source: str, env: dict[str, str], interpolate: bool = True,
                 resolve_secrets: bool = True):
        self.source = source
        self.env = env
        self.interpolate = interpolate
        self.resolve_secrets = resolve_secrets
        self.lines: dict[Path, int] = {}
        self.secret_values: set[str] = set()
        self.issues: list[Issue] = []
        self.count = 0
        self.ctor = yaml.SafeLoader.__new__(yaml.SafeLoader)
        yaml.constructor.SafeConstructor.__init__(self.ctor)

    def walk(self, node: yaml.Node, path: Path, depth: int = 0) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise SpecError([Issue(path, f"document expands to more than {MAX_NODES} values "
                                   "(YAML alias bomb?)", node.start_mark.line + 1, self.source)])
        if depth > MAX_DEPTH:
            raise SpecError([Issue(path, f"nested deeper than {MAX_DEPTH} levels",
                                   node.start_mark.line + 1, self.source)])
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            self.ctor.flatten_mapping(node)
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                key = self._construct(knode, path)
                if not isinstance(key, str):
                    self.issues.append(Issue(path, f"keys must be strings, got {key!r}",
                                             knode.start_mark.line + 1, self.source))
                    continue
                if key in out:
                    self.issues.append(Issue(path + (key,), "duplicate key",
                                             knode.start_mark.line + 1, self.source))
                    continue
                self.lines[path + (key,)] = knode.start_mark.line + 1
                out[key] = self.walk(vnode, path + (key,), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(v, path + (i,), depth + 1) for i, v in enumerate(node.value)]
        value = self._construct(node, path)
        if self.interpolate and isinstance(value, str) and "${" in value:
            value = self._interpolate(value, path, node.start_mark.line + 1)
        return value

    def _construct(self, node: yaml.Node, path: Path) -> Any:
        try:
            return self.ctor.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise
        except Exception as e:  # noqa: BLE001
            # PyYAML lets its constructors' own errors through: int() on an integer of more than
            # 4300 digits (Python's int-string limit), AttributeError on `!!timestamp 99`, ...
            # A hostile spec must get a SpecError, not a traceback.
            raise SpecError([Issue(path, f"cannot read this value: {first_line(e)[:200]}",
                                   node.start_mark.line + 1, self.source)]) from None

    def _interpolate(self, value: str, path: Path, line: int) -> Any:
        secret_names = []

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if not self.resolve_secrets and is_secret_name(name):
                return m.group(0)  # a frozen file re-read for its shape: the reference stays text
            if name in self.env:
                if is_secret_name(name):
                    secret_names.append(name)
                    self.secret_values.add(self.env[name])
                return self.env[name]
            if default is not None:
                return default
            self.issues.append(Issue(path, f"environment variable ${{{name}}} is not set "
                                     f"(use ${{{name}:-default}} for a fallback)", line, self.source))
            return m.group(0)

        out = _ENV_RE.sub(sub, value)
        if secret_names:
            # The value remembers where it came from; every JSON dump writes `value` (the template).
            return EnvSecret(out, tuple(dict.fromkeys(secret_names)), value)
        # A whole-value substitution is re-read as YAML so "${STEPS}" can be an int.
        if _ENV_RE.fullmatch(value):
            try:
                parsed = yaml.safe_load(out) if out.strip() else out
            except Exception:  # noqa: BLE001 - PyYAML's constructors raise more than YAMLError
                return out
            # Scalars only: a list or mapping from the environment would bypass the depth and
            # alias budgets the spec text itself goes through.
            return parsed if parsed is None or isinstance(parsed, str | int | float | bool) else out
        return out


def load_yaml_text(text: str, source: str = "<spec>", env: dict[str, str] | None = None,
                   resolve_secrets: bool = True) -> Loaded:
    """Parse YAML text into plain data with a line map, `${VAR}`s interpolated from `env`.

    Args:
        text: the YAML document (at most MAX_SPEC_CHARS characters).
        source: the file name shown in issues.
        env: the variables `${VAR}` reads (default: os.environ).
        resolve_secrets: False keeps secret-looking `${VAR}` references as their text (for
            re-reading frozen files whose secret values are not needed, e.g. a report).

    Raises:
        SpecError: broken YAML, alias bombs, too deep, duplicate keys, unset variables.
    """
    env = dict(os.environ) if env is None else env
    if len(text) > MAX_SPEC_CHARS:
        raise SpecError([Issue((), f"larger than {MAX_SPEC_CHARS} characters; is this a spec file?", None,
                               source)])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise SpecError([Issue((), f"nested deeper than {MAX_DEPTH} levels", None, source)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([Issue((), f"broken YAML: {problem}{_flow_hint(text, line)}", line, source)]) from None
    if node is None:
        raise SpecError([Issue((), "the spec is empty", 1, source)])
    walker = _Walker(source, env, resolve_secrets=resolve_secrets)
    try:
        data = walker.walk(node, ())
    except RecursionError:
        raise SpecError([Issue((), "YAML nested too deeply", None, source)]) from None
    except yaml.YAMLError as e:
        raise SpecError([Issue((), f"broken YAML: {e}", None, source)]) from None
    if walker.issues:
        raise SpecError(walker.issues)
    if not isinstance(data, dict):
        raise SpecError([Issue((), f"the spec must be a mapping of keys, got {type(data).__name__}",
                               1, source)])
    return Loaded(data, walker.lines, source, walker.secret_values)


def _flow_hint(text: str, line: int | None) -> str:
    """A hint when the broken line holds an unquoted `${VAR}`.

    Inside `{...}` or `[...]` YAML reads its braces as a nested mapping.
    """
    if line is None:
        return ""
    lines = text.splitlines()
    near = lines[max(0, line - 2): line]  # the line PyYAML names, and the one before (a mark can trail)
    m = next((m for ln in reversed(near) for m in re.finditer(r"(?<![\"'])\$\{[^}]*\}", ln)), None)
    if m is None:
        return ""
    return (f"; {m.group(0)} inside a flow mapping or list ({{...}} or [...]) must be quoted: "
            f"\"{m.group(0)}\" (a whole quoted value still becomes a number when it reads as one)")


def load_yaml_file(path: str, env: dict[str, str] | None = None, resolve_secrets: bool = True) -> Loaded:
    """Read a spec file (local path or fsspec URI); see `load_yaml_text`. Raises SpecError."""
    import fsspec

    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read(MAX_SPEC_CHARS + 1)
    except FileNotFoundError:
        raise SpecError([Issue((), "no such file", None, path)]) from None
    except IsADirectoryError:
        raise SpecError([Issue((), "is a directory, not a YAML file", None, path)]) from None
    except UnicodeDecodeError:
        raise SpecError([Issue((), "not UTF-8 text", None, path)]) from None
    except OSError as e:
        raise SpecError([Issue((), f"cannot read: {e.strerror or e}", None, path)]) from None
    return load_yaml_text(text, source=path, env=env, resolve_secrets=resolve_secrets)


def parse_override(item: str) -> tuple[Path, Any]:
    """`a.b.c=value` -> (("a","b","c"), parsed value). The value is read as YAML, never interpolated.

    Raises SpecError for an item without `=`, an empty segment or too deep a path.
    """
    if "=" not in item:
        raise SpecError([Issue((), f"--set {item!r}: expected path.to.key=value", None, "--set")])
    key, _, raw = item.partition("=")
    try:
        path = paths.parse_path(key)
    except paths.PathError as e:
        raise SpecError([Issue((), f"--set {item[:80]!r}: {e}", None, "--set")]) from None
    if not raw.strip():
        return path, ""
    try:
        node = yaml.compose(raw, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return path, raw  # not YAML: keep it as a string
    # The same depth and alias budgets as the spec text, and no ${VAR} expansion.
    walker = _Walker("--set", {}, interpolate=False)
    try:
        value = None if node is None else walker.walk(node, path)
    except yaml.YAMLError:  # e.g. an unknown tag such as !!python/name:...: keep it as a string
        return path, raw
    if walker.issues:
        raise SpecError(walker.issues)
    return path, value


def apply_overrides(loaded: Loaded, overrides: list[str]) -> None:
    """Apply `--set` items to `loaded.data` in place; lines of overridden paths point at `--set`.

    Raises SpecError for an item that cannot be applied (e.g. a key set on a number).
    """
    for item in overrides:
        path, value = parse_override(item)
        try:
            applied = paths.set_path(loaded.data, path, value)
        except paths.PathError as e:
            raise SpecError([Issue(e.path or path[:1], f"--set {item!r}: {e}", None, "--set")]) from None
        loaded.lines[applied] = 0  # 0 marks "from --set"
