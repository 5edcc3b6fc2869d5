"""Uploaded files (OpenAI's Files API), kept as `<state>/files/<file-id>/{content,meta.json}`.

A file is there whole or not at all: its bytes stream into `.<file-id>.partial/`, content and
meta.json are fsynced, and one rename makes the folder visible. Listing skips dot-folders, so a
crash mid-upload leaves only a partial folder nobody sees (sweep() removes it once it is old);
deleting renames the folder out of sight first, for the same reason.

Where the records live is the `FileRecords` given: meta.json beside the content (`DirRecords`,
the default), or PostgreSQL for every replica (lorag.finetune.records_pg, `[state] backend =
"postgres"`, the contents then under the shared directory); the bytes are handled here either way.

A key sees only its own files and admins see all; any other file, expired or missing, is the
same 404, so a key cannot learn that another's file exists. Everything is read from disk on each
call: a worker process beside the server may add files (a job's results) at any time.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

from lorag.adapters.checkpoints import fsync_path
from lorag.errors import LoragError, NotFoundError
from lorag.logging import get_logger
from lorag.server.pagination import cursor_page

log = get_logger("lorag.files")

FILES_DIR = "files"
UPLOAD_PURPOSES = ("fine-tune",)  # what clients may upload; the SDK's other purposes belong to APIs lorag lacks
SERVER_PURPOSES = ("fine-tune-results",)  # what only the server writes (a job's metrics CSV)
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 24 * 3600  # OpenAI's bounds for expires_after.seconds
WRITE_BYTES = 1 << 20  # gathered before each write: one thread hop per MiB, not per network chunk
STALE_PARTIAL_S = 24 * 3600  # an unfinished upload this old was a crash, not a slow client
FILE_ID_RE = re.compile(r"^file-[0-9a-f]{24}$")
PUBLIC_FIELDS = ("id", "object", "bytes", "created_at", "filename", "purpose", "status", "status_details",
                 "expires_at")


class FileNotFound(NotFoundError):
    code = "file_not_found"


class FileTooLarge(LoragError):
    status_code = 413
    code = "file_too_large"


class Caller(Protocol):
    """Who asks (lorag.serving.principal.Principal): admins see every file, a key its own."""

    @property
    def admin(self) -> bool: ...

    @property
    def key_id(self) -> str: ...


@dataclass(frozen=True)
class Staged:
    """Bytes written and fsynced under a partial folder, not yet a file anyone can see."""

    id: str
    folder: Path
    bytes: int


def check_purpose(purpose: str, allowed: tuple[str, ...] = UPLOAD_PURPOSES) -> str:
    if purpose in SERVER_PURPOSES and purpose not in allowed:
        raise LoragError(f"purpose {purpose!r} is for files the server makes (a job's results); upload files "
                         "with purpose 'fine-tune'.", param="purpose", code="invalid_value")
    if purpose not in allowed:
        accepted = ", ".join(repr(p) for p in allowed)
        raise LoragError(f"purpose {purpose!r} is not accepted here: this server accepts {accepted} "
                         "(files for fine-tuning jobs).", param="purpose", code="invalid_value")
    return purpose


def check_expiry(seconds: int | None) -> int | None:
    """expires_after.seconds within OpenAI's bounds (one hour to thirty days), or None: kept until deleted."""
    if seconds is not None and not MIN_EXPIRY_S <= seconds <= MAX_EXPIRY_S:
        raise LoragError(f"expires_after.seconds must be between {MIN_EXPIRY_S} and {MAX_EXPIRY_S}; got {seconds}.",
                         param="expires_after.seconds", code="invalid_value")
    return seconds


def clean_filename(name: str) -> str:
    """The name as shown back: its last path part, no control characters, at most 255 characters."""
    base = re.split(r"[/\\]", name)[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:255].strip()
    return base or "file"


def not_found(file_id: str) -> FileNotFound:
    return FileNotFound(f"No such file: {file_id!r}.", param="file_id")


class FileRecords(Protocol):
    """Where the files' records (meta) live; the contents are `<root>/<file-id>/content` either way."""

    root: Path

    def publish(self, folder: Path, meta: dict[str, Any]) -> None:
        """Make a staged folder (its content fsynced) the file `meta["id"]`, with its record, or raise."""

    def read(self, file_id: str) -> dict[str, Any] | None: ...

    def all(self) -> builtins.list[dict[str, Any]]: ...

    def rewrite(self, meta: dict[str, Any]) -> None:
        """A live file's record changed (its size, after replace_content)."""

    def remove(self, file_id: str) -> bool:
        """Record and content gone; False when it was already gone."""


class DirRecords:
    """Each file's record as meta.json in its folder: the folder's one rename publishes both."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def publish(self, folder: Path, meta: dict[str, Any]) -> None:
        _write_meta(folder / "meta.json", meta)
        fsync_path(folder)
        os.rename(folder, self.root / meta["id"])
        fsync_path(self.root)

    def read(self, file_id: str) -> dict[str, Any] | None:
        try:
            with open(self.root / file_id / "meta.json", encoding="utf-8") as handle:
                meta: dict[str, Any] = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:  # never written half (see above): a damaged disk
            log.warning("file_meta_unreadable", file_id=file_id, error=repr(err))
            return None
        return meta

    def all(self) -> builtins.list[dict[str, Any]]:
        try:
            names = [entry.name for entry in os.scandir(self.root) if FILE_ID_RE.match(entry.name)]
        except FileNotFoundError:
            return []
        return [meta for meta in map(self.read, names) if meta is not None]

    def rewrite(self, meta: dict[str, Any]) -> None:
        folder = self.root / meta["id"]
        _write_meta(folder / ".meta.new", meta)
        os.replace(folder / ".meta.new", folder / "meta.json")
        fsync_path(folder)

    def remove(self, file_id: str) -> bool:
        return remove_folder(self.root, file_id)


class FileStore:
    """Files under `<state_dir>/files` (or where `records` keeps them), refused past `max_bytes`;
    `clock` is the time expiry is judged by."""

    def __init__(self, state_dir: Path, max_bytes: int, *, clock: Callable[[], float] = time.time,
                 records: FileRecords | None = None) -> None:
        self.records: FileRecords = records or DirRecords(Path(state_dir) / FILES_DIR)
        self.root = self.records.root
        self.max_bytes = max_bytes
        self.clock = clock

    # -- writing ---------------------------------------------------------------------------

    async def upload(self, chunks: AsyncIterator[bytes], *, filename: str, purpose: str, owner: str,
                     expires_after_s: int | None) -> dict[str, Any]:
        """Stream `chunks` into a new file; refused (and nothing left behind) past max_bytes or on any error."""
        check_purpose(purpose)
        check_expiry(expires_after_s)
        staged = await self.stage(chunks)
        return await asyncio.to_thread(self.commit, staged, filename=filename, purpose=purpose, owner=owner,
                                       expires_after_s=expires_after_s)

    async def stage(self, chunks: AsyncIterator[bytes]) -> Staged:
        """Write `chunks` to a partial folder, off the event loop. The caller commits or discards it."""
        file_id, folder = await asyncio.to_thread(self._new_partial)
        size = 0
        pending = bytearray()
        handle: BinaryIO | None = None
        try:
            handle = await asyncio.to_thread(open, folder / "content", "wb")
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise FileTooLarge(f"The file is larger than this server's {self.max_bytes} bytes "
                                       "(fine_tuning.max_file_bytes).", param="file")
                pending += chunk
                if len(pending) >= WRITE_BYTES:
                    await asyncio.to_thread(handle.write, pending)
                    pending.clear()
            await asyncio.to_thread(_finish, handle, pending)
        except BaseException:
            if handle is not None:
                handle.close()
            shutil.rmtree(folder, ignore_errors=True)  # here, not in a thread: a cancelled task still cleans up
            raise
        return Staged(file_id, folder, size)

    def commit(self, staged: Staged, *, filename: str, purpose: str, owner: str, expires_after_s: int | None,
               purposes: tuple[str, ...] = UPLOAD_PURPOSES) -> dict[str, Any]:
        """Make a staged file visible (its record published); any failure discards it."""
        try:
            check_purpose(purpose, purposes)
            check_expiry(expires_after_s)
            now = int(self.clock())
            meta = {"id": staged.id, "object": "file", "bytes": staged.bytes, "created_at": now,
                    "filename": clean_filename(filename), "purpose": purpose, "status": "processed",
                    "status_details": None,
                    "expires_at": now + expires_after_s if expires_after_s is not None else None,
                    "owner": owner, "created_ns": time.time_ns()}
            self.records.publish(staged.folder, meta)
        except BaseException:
            self.discard(staged)
            raise
        log.info("file_stored", file_id=staged.id, bytes=staged.bytes, purpose=purpose, owner=owner)
        return public(meta)

    def discard(self, staged: Staged) -> None:
        shutil.rmtree(staged.folder, ignore_errors=True)

    def add_bytes(self, data: bytes, *, filename: str, purpose: str, owner: str) -> dict[str, Any]:
        """A file the server makes itself (a job's results: purpose "fine-tune-results")."""
        allowed = UPLOAD_PURPOSES + SERVER_PURPOSES
        check_purpose(purpose, allowed)
        if len(data) > self.max_bytes:
            raise FileTooLarge(f"The file is larger than this server's {self.max_bytes} bytes.", param="file")
        file_id, folder = self._new_partial()
        staged = Staged(file_id, folder, len(data))
        try:
            with open(folder / "content", "wb") as handle:
                _finish(handle, data)
        except BaseException:
            self.discard(staged)
            raise
        return self.commit(staged, filename=filename, purpose=purpose, owner=owner, expires_after_s=None,
                           purposes=allowed)

    def replace_content(self, file_id: str, data: bytes) -> bool:
        """A stored file's content replaced whole (write, fsync, rename; its size updated): how a deleted
        stored completion leaves the training files made from it. False when the file is gone."""
        folder = self.root / file_id
        meta = self._read(file_id)
        if meta is None:
            return False
        fresh = folder / ".content.new"
        try:
            with open(fresh, "wb") as handle:
                _finish(handle, data)
            os.replace(fresh, folder / "content")
            meta["bytes"] = len(data)
            self.records.rewrite(meta)
        except FileNotFoundError:  # deleted meanwhile
            return False
        log.info("file_rewritten", file_id=file_id, bytes=len(data))
        return True

    def _new_partial(self) -> tuple[str, Path]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            file_id = "file-" + secrets.token_hex(12)
            folder = self.root / f".{file_id}.partial"
            if not (self.root / file_id).exists():
                with contextlib.suppress(FileExistsError):
                    folder.mkdir(mode=0o700)
                    return file_id, folder

    # -- reading ---------------------------------------------------------------------------

    def get(self, file_id: str, principal: Caller) -> dict[str, Any]:
        return public(self._visible(file_id, principal))

    def path_of(self, file_id: str, principal: Caller) -> Path:
        """The content file (read it at once: a delete removes it)."""
        return self.root / self._visible(file_id, principal)["id"] / "content"

    def owner_of(self, file_id: str) -> str | None:
        """Whose file this is (a key id), or None when there is no such live file."""
        meta = self._read(file_id)
        return None if meta is None or self._expired(meta) else str(meta["owner"])

    def list(self, principal: Caller, *, purpose: str | None, order: Literal["asc", "desc"], after: str | None,
             limit: int) -> dict[str, Any]:
        """One page of the caller's live files, oldest first ("asc") or newest first ("desc")."""
        metas = [m for m in self._live() if _may_see(principal, m) and purpose in (None, m["purpose"])]
        metas.sort(key=lambda m: (m["created_at"], m["created_ns"], m["id"]), reverse=order == "desc")
        return cursor_page([public(m) for m in metas], after=after, limit=limit)

    def delete(self, file_id: str, principal: Caller) -> dict[str, Any]:
        self._visible(file_id, principal)
        if not self._remove(file_id):
            raise not_found(file_id)  # a concurrent delete won
        log.info("file_deleted", file_id=file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    def sweep(self) -> int:
        """Delete expired files (and partial folders a crash left); how many files went."""
        return self._scan()[1]

    def _live(self) -> builtins.list[dict[str, Any]]:
        return self._scan()[0]

    def _scan(self) -> tuple[builtins.list[dict[str, Any]], int]:
        """Every live file's meta, and how many expired ones were deleted on the way (stale partials go too)."""
        live: builtins.list[dict[str, Any]] = []
        expired = 0
        for meta in self.records.all():
            file_id = meta["id"]
            if self._expired(meta):
                if self._remove(file_id):
                    log.info("file_expired", file_id=file_id)
                    expired += 1
                continue
            live.append(meta)
        self._clear_stale()
        return live, expired

    def _visible(self, file_id: str, principal: Caller) -> dict[str, Any]:
        meta = self._read(file_id)
        if meta is not None and self._expired(meta):
            self._remove(file_id)
            meta = None
        if meta is None or not _may_see(principal, meta):
            raise not_found(file_id)
        return meta

    def _read(self, file_id: str) -> dict[str, Any] | None:
        return self.records.read(file_id) if FILE_ID_RE.match(file_id) else None

    def _expired(self, meta: dict[str, Any]) -> bool:
        return meta.get("expires_at") is not None and meta["expires_at"] <= self.clock()

    def _remove(self, file_id: str) -> bool:
        return self.records.remove(file_id)

    def _clear_stale(self) -> None:
        """Partial or half-deleted folders left by a crash, once nothing can still be writing them."""
        try:
            entries = [e for e in os.scandir(self.root) if e.name.startswith(".file-") and e.is_dir()]
        except FileNotFoundError:
            return
        cutoff = time.time() - STALE_PARTIAL_S
        for entry in entries:
            folder = Path(entry.path)
            with contextlib.suppress(OSError):
                if max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir()]) < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)


def remove_folder(root: Path, file_id: str) -> bool:
    """A file's folder out of sight in one rename, then removed; False when it was already gone."""
    hidden = root / f".{file_id}.deleting.{secrets.token_hex(4)}"
    try:
        os.rename(root / file_id, hidden)
    except FileNotFoundError:
        return False
    shutil.rmtree(hidden, ignore_errors=True)
    return True


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
        handle.flush()
        os.fsync(handle.fileno())


def public(meta: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI FileObject: the stored record less who owns it and the ordering clock."""
    return {name: meta.get(name) for name in PUBLIC_FIELDS}


def _may_see(principal: Caller, meta: dict[str, Any]) -> bool:
    return principal.admin or meta.get("owner") == principal.key_id


def _finish(handle: BinaryIO, tail: bytes | bytearray) -> None:
    """Write the last bytes, fsync and close: the content is on disk before meta.json names it."""
    with handle:
        handle.write(tail)
        handle.flush()
        os.fsync(handle.fileno())
