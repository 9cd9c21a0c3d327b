"""The one cause-finder: any failure (an exception, or its text from a log) -> one line naming its root.

A failed run reaches the user wrapped several times: the worker's exception travels inside Ray Train's
`UserExceptionWithTraceback`, inside a `WorkerGroupError` ("Training failed due to worker errors:"
then one `[Rank N Error Snippet]:` traceback per group of ranks) or a `ControllerError`, inside
raybig's `TrainingFailed`, maybe inside a `RayTaskError(FileNotFoundError)`; or only its text
survives (a job's log tail, Ray's job `message`). `root_cause` digs through all of these and
returns `Name: message` for the exception that started it: the first exception of a chain
(`__cause__`, or `__context__` unless suppressed), as Python prints it first; a module-qualified
name is kept as written (`torch.OutOfMemoryError: CUDA out of memory ...`).

`is_deterministic` says whether a worker error is one a worker-group restart cannot fix (a missing
file, a raybig data/spec error, an incomplete checkpoint): the driver stops on those at once.

No Ray or torch import at module level: the CLI and the cluster entrypoint use it too.
"""

from __future__ import annotations

import builtins
import re
from typing import Any

from raybig.errors import RaybigError

MAX_CHARS = 400  # the message part of a cause line

# `Name: message` at the start of a line; the name may be dotted (`torch.OutOfMemoryError`) and may
# carry Ray's cause marker (`ray.exceptions.RayTaskError(FileNotFoundError)`).
_EXC_LINE = re.compile(
    r"^(?P<name>(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Warning|Failed|Failure)"
    r"(?:\((?P<inner>[\w.]+)\))?)(?::\s?(?P<msg>.*))?$")
_CHAIN_SEP = ("The above exception was the direct cause of the following exception:",
              "During handling of the above exception, another exception occurred:")
_SNIPPET = re.compile(r"^\[Rank (?P<ranks>[\d,]+) Error Snippet\]:\s*$", re.M)
_NODE_IP = re.compile(r"node_ip='([^']+)'|ip=([\d.]+)")
# Wrapper headers whose own text is not a cause.
_WRAPPERS = ("Training failed due to worker errors:", "Training failed due to controller error:")

# Worker errors a restart cannot fix. Matched by type for exception objects and by name in text.
DETERMINISTIC = (FileNotFoundError, NotADirectoryError, IsADirectoryError, ModuleNotFoundError,
                 SyntaxError)
_DETERMINISTIC_NAMES = {"FileNotFoundError", "NotADirectoryError", "IsADirectoryError",
                        "ModuleNotFoundError", "SyntaxError", "DataError", "BadRecordError",
                        "IncompleteCheckpointError", "UsageError", "SpecError"}


def _name(e: BaseException) -> str:
    """`FileNotFoundError`, `torch.OutOfMemoryError`; raybig's and builtins' without a module."""
    t = type(e)
    name = t.__name__
    mod = t.__module__ or ""
    if mod == "builtins" or getattr(builtins, name, None) is t or mod.startswith("raybig") or "(" in name:
        return name  # RayTaskError(X): Ray's name already says what it wraps
    return f"{mod.split('.')[0]}.{name}"


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return first[:MAX_CHARS]


def _children(e: BaseException) -> list[BaseException]:
    """What `e` wraps, innermost-first candidates (Ray's and raybig's wrappers)."""
    inner: list[BaseException] = []
    failures = getattr(e, "worker_failures", None)  # ray.train.WorkerGroupError
    if isinstance(failures, dict) and failures:
        ranked = sorted(failures.items(), key=lambda kv: kv[0])
        # Prefer a rank that raised over ranks that only died with it (collective aborts).
        ranked.sort(key=lambda kv: _collateral(kv[1]))
        inner.append(ranked[0][1])
    for attr in ("controller_failure", "_base_exc", "cause"):  # ControllerError, Ray Train, RayTaskError
        v = getattr(e, attr, None)
        if isinstance(v, BaseException) and v is not e:
            inner.append(v)
    return inner


def _collateral(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer",
                                   "NCCL communicator was aborted", "Gloo", "ProcessGroup")) and \
        not is_deterministic(e)


def root_exception(e: BaseException) -> BaseException:
    """The exception that started `e`: through Ray/raybig wrappers and `__cause__`/`__context__`."""
    seen: set[int] = set()
    cur = e
    while id(cur) not in seen:
        seen.add(id(cur))
        kids = _children(cur)
        if kids:
            cur = kids[0]
            continue
        nxt = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
        if nxt is None:
            break
        cur = nxt
    return cur


def _is_wrapper(e: BaseException) -> bool:
    return bool(_children(e)) or str(e).strip().startswith(_WRAPPERS)


def root_cause(err: BaseException | str) -> str:
    """One line, `Name: message`, naming the root exception of `err` (an exception or its text).

    A raybig error whose own message already is a summary (`TrainingFailed`, ...) is kept as it is:
    its text names the root cause it was built from.
    """
    if isinstance(err, str):
        return cause_from_text(err)
    if isinstance(err, RaybigError) and str(err).strip():
        return f"{_name(err)}: {_one_line(str(err))}"
    root = root_exception(err)
    text = str(root)
    if _is_wrapper(root) or _EXC_LINE.search(text.strip().splitlines()[-1] if text.strip() else ""):
        # Only the text survived (a pickled wrapper, a RayTaskError without its cause): read it.
        from_text = cause_from_text(text)
        if from_text:
            return from_text
    msg = _one_line(text)
    return f"{_name(root)}: {msg}" if msg else _name(root)


def _blocks(text: str) -> list[str]:
    """A traceback text split into its chain's blocks, first (the root) first."""
    pattern = "|".join(re.escape(s) for s in _CHAIN_SEP)
    return [b for b in re.split(pattern, text) if b.strip()]


def _last_exception_line(block: str) -> tuple[str, str] | None:
    """(name, message) of the last `Name: message` line of a traceback block (its exception)."""
    lines = block.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        ln = lines[i].strip()
        m = _EXC_LINE.match(ln)
        if not m or lines[i].startswith((" ", "\t")):
            continue
        name = m.group("name")
        msg = (m.group("msg") or "").strip()
        if m.group("inner") and msg.startswith("ray::"):
            # Ray's RayTaskError(X) first line is the task's name; X's own line follows below.
            continue
        return name, msg
    return None


def cause_from_text(text: str) -> str:
    """`cause_from_text` for a failure's text: a traceback, Ray's worker-group text, a log tail."""
    text = text.strip()
    if not text:
        return ""
    lines_ = text.splitlines()
    died = (next((ln.strip() for ln in lines_ if "died because" in ln or "is dead because" in ln), None)
            or next((ln.strip() for ln in lines_ if "died unexpectedly" in ln), None))
    # Ray Train's worker-group text: one snippet per group of ranks; the first is the lowest rank.
    snippets = _SNIPPET.split(text)
    if len(snippets) > 1:
        parts = [(snippets[i], snippets[i + 1]) for i in range(1, len(snippets) - 1, 2)]
        parts.sort(key=lambda p: _collateral_text(p[1]))
        ranks, body = parts[0]
        inner = cause_from_text(body)
        return f"{inner} (rank {ranks})" if inner else ""
    for block in _blocks(text):  # the chain's first block is the root
        found = _last_exception_line(block)
        if found:
            name, msg = found
            return f"{name}: {msg[:MAX_CHARS]}" if msg else name
    if died:
        return died[:MAX_CHARS]
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.strip().startswith(_WRAPPERS)]
    return lines[-1][:MAX_CHARS] if lines else ""


def _collateral_text(body: str) -> bool:
    return any(s in body for s in ("Connection closed by peer", "Connection reset by peer",
                                   "NCCL communicator was aborted"))


def worker_node(err: BaseException | str) -> str | None:
    """The node IP Ray names for the failing worker, when its text says (`node_ip='...'`)."""
    m = _NODE_IP.search(str(err))
    return (m.group(1) or m.group(2)) if m else None


def is_deterministic(e: BaseException | Any) -> bool:
    """Whether a worker's error is one a restart cannot fix.

    Its root is a missing file, a raybig data or spec error, an incomplete checkpoint, or a missing
    plug-in module. Only exception objects count: text alone never stops a run.
    """
    if not isinstance(e, BaseException):
        return False
    root = root_exception(e)
    if isinstance(root, DETERMINISTIC):
        return True
    if isinstance(root, RaybigError):
        return True  # raybig raises these on purpose, for inputs a retry does not change
    cause = cause_from_text(str(root)) if _is_wrapper(root) else ""
    name = cause.split(":", 1)[0].split(".")[-1] if cause else ""
    return name in _DETERMINISTIC_NAMES
