"""User plug-ins (`model.target: package.module:factory`): where their modules are imported from.

A leaf (no torch, nothing else from raybig), so `raybig validate` can set the import path without
importing the training loop.
"""

from __future__ import annotations

import sys


def add_python_path(paths: list[str]) -> None:
    """Put `paths` at the front of `sys.path` (in the given order), skipping empty and present ones."""
    for p in reversed(paths):
        if p and p not in sys.path:
            sys.path.insert(0, p)
