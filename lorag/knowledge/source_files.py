"""What ingestion takes in: files named by paths, folders or globs, confined to allowed roots,
and what it skipped and why."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lorag.knowledge.errors import IngestInputError, PathNotAllowed
from lorag.knowledge.readers import file_type_of
from lorag.paths import inside_roots

_GLOB_CHARS = re.compile(r"[*?\[]")



@dataclass
class SourceFile:
    """One document to ingest: a file on disk, or bytes (an upload) under a source name."""

    source: str
    name: str  # picks the reader by extension
    path: Path | None = None
    data: bytes | None = None
    origin: str = "path"

    def size(self) -> int:
        return len(self.data) if self.data is not None else (self.path.stat().st_size if self.path else 0)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


@dataclass
class Skipped:
    source: str
    reason: str
    kind: str  # "unsupported" | "unreadable" | "empty" | "too_large" | "not_allowed" | "empty_record"

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason, "kind": self.kind}


@dataclass
class Collected:
    files: list[SourceFile]
    skipped: list[Skipped]
    scope: Callable[[str], bool]  # which existing sources these inputs cover (for --sync)


def collect_paths(
    inputs: Iterable[str], *, recursive: bool = True, allowed_roots: list[str] | None = None
) -> Collected:
    """Expand files, folders and globs; refuse missing paths before anything is written."""
    files: dict[str, SourceFile] = {}
    skipped: list[Skipped] = []
    scopes: list[Callable[[str], bool]] = []
    roots = [Path(r).expanduser().resolve() for r in allowed_roots] if allowed_roots is not None else None
    inputs = list(inputs)
    if not inputs:
        raise IngestInputError("no paths given to ingest", param="paths")

    def allowed(path: Path) -> bool:
        if roots is None:
            return True
        return inside_roots(path, roots) is not None

    def add_file(path: Path, explicit: bool) -> None:
        source = os.path.abspath(path)
        if not allowed(path):
            skipped.append(Skipped(source, "outside the allowed roots", "not_allowed"))
            return
        if not explicit and file_type_of(path.name) is None:
            skipped.append(Skipped(source, f"unsupported file type {path.suffix or '(none)'!r}", "unsupported"))
            return
        files.setdefault(source, SourceFile(source=source, name=path.name, path=path))

    for raw in inputs:
        text = os.path.expanduser(raw)
        path = Path(text)
        if roots is not None and (path.exists() or not _GLOB_CHARS.search(text)):
            if not path.is_absolute():
                raise PathNotAllowed(f"server-side paths must be absolute: {raw}", param="paths")
            if not allowed(path):
                raise PathNotAllowed(
                    f"{raw} is outside the allowed roots (knowledge.ingest.allowed_roots)", param="paths"
                )
        if path.is_file():
            add_file(path, explicit=True)
            scopes.append(_exact(os.path.abspath(path)))
        elif path.is_dir():
            base = os.path.abspath(path)
            for file in _walk(path, recursive):
                add_file(file, explicit=False)
            scopes.append(_under(base, recursive))
        elif _GLOB_CHARS.search(text):
            pattern = os.path.abspath(text)
            if roots is not None and inside_roots(_glob_base(pattern), roots) is None:
                raise PathNotAllowed(f"{raw} is outside the allowed roots", param="paths")
            matches = sorted(glob.glob(pattern, recursive=True))
            matched_files = [Path(m) for m in matches if Path(m).is_file() and not _hidden(Path(m))]
            if not matched_files:
                raise IngestInputError(f"no files match {raw}", param="paths")
            for file in matched_files:
                add_file(file, explicit=False)
            scopes.append(_glob_scope(pattern))
        elif path.exists():
            raise IngestInputError(f"not a regular file or folder: {raw}", param="paths")
        else:
            raise IngestInputError(f"no such file or directory: {raw}", param="paths")
    return Collected(files=list(files.values()), skipped=skipped, scope=lambda s: any(f(s) for f in scopes))


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") and part not in (".", "..") for part in path.parts)


def _walk(root: Path, recursive: bool) -> Iterator[Path]:
    """Regular files under a folder, sorted, skipping hidden files and folders (.git, ...)."""
    if not recursive:
        yield from sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        return
    for current, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                path = Path(current) / name
                if path.is_file():
                    yield path


def _exact(source: str) -> Callable[[str], bool]:
    return lambda s: s == source


def _under(base: str, recursive: bool) -> Callable[[str], bool]:
    prefix = base.rstrip("/") + "/"
    if recursive:
        return lambda s: s.startswith(prefix)
    return lambda s: s.startswith(prefix) and "/" not in s[len(prefix) :]


def _glob_base(pattern: str) -> str:
    parts = Path(pattern).parts
    base = [p for p in parts[: next((i for i, p in enumerate(parts) if _GLOB_CHARS.search(p)), len(parts))]]
    return os.path.join(*base) if base else "/"


def _glob_scope(pattern: str) -> Callable[[str], bool]:
    """glob semantics as a regex: `*` stays within one folder, `**/` spans folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    regex = re.compile("".join(out) + r"\Z")
    return lambda s: regex.match(s) is not None
