"""Confining paths that arrive from outside (API bodies, config) to allowed root directories.

One function decides for every door (adapter registration, knowledge ingestion), so a
fix to the rule reaches all of them. The check runs on the real path: `..` and every
symlink are resolved first, so neither a traversal nor a symlink placed inside a root
can point the server at a file outside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def inside_roots(path: str | os.PathLike[str], roots: Iterable[str | os.PathLike[str]]) -> Path | None:
    """The real path if it lies in or under one of `roots` (themselves resolved), else None."""
    try:
        real = Path(path).expanduser().resolve()
    except (ValueError, OSError, RuntimeError):  # a NUL byte, an unknown ~user: no such path is allowed
        return None
    for root in roots:
        real_root = Path(root).expanduser().resolve()
        if real == real_root or real.is_relative_to(real_root):
            return real
    return None
