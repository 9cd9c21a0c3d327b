"""The `raybig` command line: `main`, the console script's entry (`raybig = "raybig.cli:main"`).

Its commands live in `raybig.cli.app` and in one module per command group, each registering itself
on `main` when imported here.

The library never imports this package (an import-linter contract); only `raybig.__main__` does.
"""

from __future__ import annotations

from raybig.cli import (  # command modules register themselves on `main`; add yours here
    data,  # noqa: F401  (prepare)
    eval,  # noqa: F401  (eval)
    export,  # noqa: F401  (export)
    jobs,  # noqa: F401  (submit, status, logs, stop, list, queue, cluster)
    report,  # noqa: F401  (report)
    serve,  # noqa: F401  (serve status, serve down)
    sweep,  # noqa: F401  (sweep report)
)
from raybig.cli.app import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    main()
