"""Every error raybig raises on purpose, in one leaf module.

Library code raises a `RaybigError` subclass; the CLI catches `RaybigError` once, at its edge, and
prints `str(error)` as one line and exits with `error.exit_code`. Nothing here imports the rest of
raybig, so any layer may import it. (Modelled on skypilot's `sky/exceptions.py`.)

Exit codes (documented in the README):
  0 success; 1 the job or command failed; 2 a spec or usage error (nothing was started);
  3 the cluster could not be reached, refused the token, or does not know the job;
  130 interrupted with Ctrl-C.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_FAILED = 1
EXIT_SPEC = 2
EXIT_CLUSTER = 3
EXIT_INTERRUPTED = 130

Path = tuple[str | int, ...]


def dotted_path(path: Path) -> str:
    """`("train", "lr")` -> `train.lr`; list indices as `[i]`: `("search", 0)` -> `search[0]`."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def first_line(e: BaseException) -> str:
    """`TypeName: first line of the message` (or just the type name); the one place this is written."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class RaybigError(Exception):
    """Base of every error raybig raises for a user to act on; printed as one line.

    Args:
        message: the one line to print (no traceback is shown).
        exit_code: overrides the class's default exit code.
    """

    exit_code: int = EXIT_FAILED

    def __init__(self, message: str = "", exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(RaybigError):
    """A command was called wrongly (bad argument, wrong kind of spec for it); exit 2."""

    exit_code = EXIT_SPEC


@dataclass
class Issue:
    """One problem in a spec: where (YAML path + line, 0 for a `--set` override) and what."""

    path: Path
    message: str
    line: int | None = None
    source: str = ""

    def render(self) -> str:
        """`file:line: dotted.path: message`."""
        where = self.source or "<spec>"
        if self.line == 0:
            where = "--set"
        elif self.line is not None:
            where += f":{self.line}"
        return f"{where}: {dotted_path(self.path) or '<root>'}: {self.message}"


class SpecError(RaybigError):
    """A spec failed to load or validate; holds every issue found (printed one per line); exit 2."""

    exit_code = EXIT_SPEC

    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__("\n".join(i.render() for i in issues))


class ClusterError(RaybigError):
    """The cluster is unreachable, refused the token, or does not know the job; exit 3."""

    exit_code = EXIT_CLUSTER


class TrainingFailed(RaybigError):
    """A training run failed; the message is the root cause's first line; exit 1."""


class IncompleteCheckpointError(RaybigError):
    """A checkpoint is missing files its manifests list (a partial upload); exit 1."""


class CheckpointConversionError(RaybigError):
    """A ZeRO checkpoint could not be converted for a resume at another worker count; exit 1.

    The checkpoint itself is left as it was.
    """


class SweepMismatch(RaybigError):
    """A sweep was re-run under a name whose stored experiment has a different spec; exit 2."""

    exit_code = EXIT_SPEC


class ResumeMismatch(RaybigError):
    """A train spec was re-run under a name whose checkpoint it cannot load (another model, stage, ...); exit 2."""

    exit_code = EXIT_SPEC


class ServeError(RaybigError):
    """Deploying, querying or removing a Serve application failed; exit 1."""


class PipelineFailed(RaybigError):
    """A pipeline stage failed; the message names the stage; exit 1."""


class ReportError(RaybigError):
    """A run directory cannot be reported on (missing or unreadable files); exit 2."""

    exit_code = EXIT_SPEC


class EvalTaskError(RaybigError):
    """An eval task is unknown, or its task file or data files are missing or malformed; exit 2."""

    exit_code = EXIT_SPEC


class EvalFailed(RaybigError):
    """An evaluation could not run on the model (the export does not load, lm-eval failed); exit 1."""


class TrackingError(RaybigError):
    """The tracking store cannot be reached or used (bad scheme, no server, unwritable dir); exit 2."""

    exit_code = EXIT_SPEC


class TaskError(RaybigError):
    """A task name, its options or a batch does not fit the task (unknown name, bad labels); exit 2."""

    exit_code = EXIT_SPEC


class ClassifierDataError(RaybigError):
    """Arrays that do not fit the classifier (shapes, labels out of range, non-finite); exit 2."""

    exit_code = EXIT_SPEC
