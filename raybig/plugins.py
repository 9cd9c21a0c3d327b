"""User plug-ins (`model.target`, `data.target`: package.module:factory): import path, validate-time check, loss.

Where their modules are imported from (`add_python_path`), a check of the target that `raybig
validate` can afford (`check_target`), and the accepted shapes of a forward's loss (`loss_of`).

A leaf (no torch, nothing else from raybig), so `raybig validate` can set the import path and check a
target without importing the training loop, torch, or the plug-in itself.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
from typing import Any


def add_python_path(paths: list[str]) -> None:
    """Put `paths` at the front of `sys.path` (in the given order), skipping empty and present ones."""
    for p in reversed(paths):
        if p and p not in sys.path:
            sys.path.insert(0, p)


def _signature_from_ast(fn: ast.FunctionDef | ast.AsyncFunctionDef, skip_first: bool) -> inspect.Signature:
    """An `inspect.Signature` with the parameter kinds and default-ness of a `def` (defaults are dummies)."""
    a = fn.args
    params: list[inspect.Parameter] = []
    positional = [*a.posonlyargs, *a.args]
    if skip_first and positional:
        positional = positional[1:]
    n_defaults = len(a.defaults)
    for i, arg in enumerate(positional):
        kind = (inspect.Parameter.POSITIONAL_ONLY if arg in a.posonlyargs
                else inspect.Parameter.POSITIONAL_OR_KEYWORD)
        has_default = i >= len(positional) - n_defaults
        params.append(inspect.Parameter(arg.arg, kind, default=None if has_default else inspect.Parameter.empty))
    if a.vararg:
        params.append(inspect.Parameter(a.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        params.append(inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY,
                                        default=inspect.Parameter.empty if d is None else None))
    if a.kwarg:
        params.append(inspect.Parameter(a.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


def _factory_signature(tree: ast.Module, name: str) -> tuple[bool, inspect.Signature | None]:
    """(is `name` defined at the module's top level, its call signature when a plain def/class shows it)."""
    found, sig = False, None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            found, sig = True, _signature_from_ast(node, skip_first=False)
        elif isinstance(node, ast.ClassDef) and node.name == name:
            init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            # No __init__ of its own: a base class (e.g. nn.Module) decides; do not guess.
            found, sig = True, _signature_from_ast(init, skip_first=True) if init else None
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                found, sig = True, None
        elif isinstance(node, ast.Import | ast.ImportFrom):
            if any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
                found, sig = True, None
        elif isinstance(node, ast.If | ast.Try):  # conditional definitions: trust they exist
            if name in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} or any(
                    getattr(n, "name", None) == name for n in ast.walk(node)):
                found, sig = True, None
    return found, sig


def check_target(target: str, kwargs: dict[str, Any], passed: dict[str, Any]) -> tuple[str, str] | None:
    """Check a `model.target` without importing it (so without torch): (sub path, message), or None if fine.

    The module must be importable (found on `sys.path`: the working directory, the spec's folder),
    define the factory at its top level, and accept `kwargs` plus those of `passed` (what raybig
    adds, `vocab_size` and `seq_len`) that it names. Read from the module's source with `ast`; a
    factory defined in ways the source does not show (imported, assigned) is trusted.

    Args:
        target: 'package.module:factory'.
        kwargs: the spec's `model.kwargs`.
        passed: what raybig passes when the factory takes it (name -> value).
    """
    mod_name, _, attr = target.partition(":")
    try:
        found = importlib.util.find_spec(mod_name)
    except (ImportError, ValueError) as e:  # a parent package that is not there, or fails to import
        return "target", f"cannot import {mod_name!r}: {e} (sys.path holds the working directory and the spec's folder)"
    if found is None:
        return "target", (f"no module {mod_name!r} on the import path (the working directory and the spec's "
                          f"folder are on it)")
    origin = found.origin
    if not origin or not origin.endswith(".py"):
        return None  # a compiled or namespace module: only importing it would tell
    try:
        with open(origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=origin)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as e:
        return "target", f"cannot read {origin}: {e}"
    exists, sig = _factory_signature(tree, attr)
    if not exists:
        names = sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef))
        import difflib

        close = difflib.get_close_matches(attr, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f" (it defines {', '.join(names[:8])})" if names else "")
        return "target", f"{mod_name} ({origin}) has no {attr!r}{hint}"
    if sig is None:
        return None
    call = dict(kwargs)
    for k, v in passed.items():
        if k in sig.parameters and k not in call:
            call[k] = v
    try:
        sig.bind(**call)
    except TypeError as e:
        where = "kwargs" if kwargs else "target"
        return where, f"{target} refuses these arguments: {e} (it takes {_params_text(sig)})"
    return None


def _params_text(sig: inspect.Signature) -> str:
    names = [p.name for p in sig.parameters.values()
             if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    return ", ".join(names) if names else "no arguments"


def loss_of(out: Any) -> Any:
    """The loss a plug-in's `forward(idx, targets)` returned, in any of the accepted shapes.

    Accepted: the scalar loss tensor itself; an object with a `.loss` (Hugging Face's ModelOutput);
    a tuple or list holding one scalar tensor among others (nanoGPT's `(logits, loss)`).

    Raises:
        TypeError: none of these (the message says what came back).
    """
    if getattr(out, "ndim", None) == 0:
        return out
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    if isinstance(out, tuple | list):
        scalars = [v for v in out if getattr(v, "ndim", None) == 0]
        if len(scalars) == 1:
            return scalars[0]
    shape = getattr(out, "shape", None)
    raise TypeError(f"a plug-in's forward(idx, targets) must return the scalar loss, (logits, loss), or an "
                    f"object with .loss; it returned {type(out).__name__}{f' of shape {tuple(shape)}' if shape else ''}")


def target_problems(spec: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """(path, message) for every `model.target` and `data.target` in `spec` that `check_target` refuses.

    `task: custom` (`raybig.train.plugin_task`) passes its factories `seed` (and a dataset `split`);
    the older `model.target` of a language model gets `vocab_size` and `seq_len`.

    Looks at a train spec's model, a sweep's `base.model` and a pipeline's `sweep.base.model` (by
    attribute, so this leaf needs no spec classes). For `raybig.spec.load_spec(checks=...)`.
    """
    from raybig.tokenizer import BYTE_VOCAB

    found: list[tuple[tuple[str, ...], Any]] = []
    if getattr(spec, "kind", None) == "train":
        found.append(((), spec))
    elif getattr(spec, "kind", None) == "sweep":
        found.append((("base",), spec.base))
    elif getattr(spec, "kind", None) == "pipeline":
        found.append((("sweep", "base"), spec.sweep.base))
    out: list[tuple[tuple[str | int, ...], str]] = []
    for prefix, train in found:
        m = train.model
        custom = getattr(train, "task", None) == "custom"  # raybig.train.plugin_task: the seed, not the vocab
        if getattr(m, "target", None) is not None:
            passed = {"seed": train.seed} if custom else {"vocab_size": m.vocab_size or BYTE_VOCAB,
                                                          "seq_len": train.data.seq_len}
            problem = check_target(m.target, dict(m.kwargs), passed)
            if problem:
                out.append(((*prefix, "model", problem[0]), problem[1]))
        d = train.data
        if getattr(d, "target", None) is not None:
            problem = check_target(d.target, dict(d.kwargs), {"split": "train", "seed": train.seed})
            if problem:
                out.append(((*prefix, "data", problem[0]), problem[1]))
    return out
