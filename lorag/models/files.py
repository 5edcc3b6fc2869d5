"""File helpers the importer and the fetcher share: hashing, free space, atomic placement.

Why here: a model is hundreds of megabytes written over a minute; any of those
writes can fail (a full disk, Ctrl-C). Everything is written to a temporary
sibling first and renamed into place, so a reader never sees half a model.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorag.models.errors import NotEnoughDiskSpace

CHUNK = 1 << 20
# Slack on top of an estimate: tokenizer files, metadata, the filesystem's own rounding.
SPACE_MARGIN_BYTES = 64 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (models do not fit comfortably in memory twice)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def free_bytes(path: Path) -> int:
    """Free space on the filesystem holding `path` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def ensure_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse before writing when `needed` bytes (plus a margin) would not fit under `path`."""
    free = free_bytes(path)
    if free < needed + SPACE_MARGIN_BYTES:
        raise NotEnoughDiskSpace(
            f"not enough disk space for {what}: about {human_bytes(needed + SPACE_MARGIN_BYTES)} "
            f"needed, {human_bytes(free)} free under {path}"
        )


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024:
            return f"{count:.0f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def is_no_space(err: BaseException) -> bool:
    """An OSError meaning the disk (or quota) is full, wherever in a library it was raised."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def staging_dir(parent: Path, label: str) -> Iterator[Path]:
    """A fresh hidden directory under `parent`, removed on any failure (Ctrl-C included).

    The caller moves it into place before leaving the block; whatever is left is deleted.
    """
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".import-{label}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_permissions(folder: Path) -> None:
    """Give a staged folder the modes a plain mkdir/open would have (mkdtemp makes it private)."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is renamed aside first and deleted last.

    Every step is a rename on one filesystem, so at each instant `target` is either
    the whole old directory or the whole new one.
    """
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".replaced-{target.name}-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

