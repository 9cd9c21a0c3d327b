"""What a caller sees while a spec runs: callbacks the CLI passes in (library code never prints).

`RunHooks` shows nothing (library use, `--json`); the CLI's subclass (`raybig.cli.progress`) draws
the progress bar and prints notes. Runners, the pipeline and `run_train` call these hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raybig.spec.models import TrainSpec

MetricsCallback = Callable[[dict[str, Any]], None]


class RunHooks:
    """Progress callbacks for one `run_spec`; this base is silent.

    Attributes:
        quiet: True asks components that print on their own (Ray Tune's trial lines) to stay silent.
    """

    quiet: bool = True

    def train(self, spec: TrainSpec) -> AbstractContextManager[MetricsCallback | None]:
        """Entered around one train run of `spec`; yields the callback for each metrics record (or None)."""
        return contextlib.nullcontext(None)

    def note(self, text: str) -> None:
        """One line for a person about what happens (a pipeline stage skipped, a server stopping)."""

    def serving(self, info: dict[str, Any]) -> None:
        """A Serve app is RUNNING until Ctrl-C; `info` is `raybig.serve.local.start_serve`'s result."""
