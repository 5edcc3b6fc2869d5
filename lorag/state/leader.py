"""Leadership: the one process among several that does what must be done once.

Replicas in front of one fleet share its servers, and workers on one host share a state
directory. Loading and unloading adapters on the servers (the fleet's reconcile) and running
fine-tuning jobs must each happen in one process only, or two replicas unload what the other
just loaded and two runners train the same job. A leader holds a lock that dies with it:

- `FileLeadership`: flock on a file (processes on one host); the kernel drops it with the process;
- `PostgresLeadership`: a session advisory lock (replicas on any host); PostgreSQL drops it when
  the session ends: at once when the process dies, after TCP keep-alive when its host vanishes.

Both are tried again by `LeaderKeeper` every few seconds, so a follower takes over within one
interval of the leader's death, and a leader that lost its database connection stops leading.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import zlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import psycopg

from lorag.logging import get_logger
from lorag.state.database import connect, describe

if TYPE_CHECKING:
    from lorag.config import Settings

log = get_logger("lorag.state")


class Leadership(Protocol):
    held: bool
    blocking: bool  # try_hold waits on the network: the keeper runs it in a thread

    def try_hold(self) -> bool:
        """Take the lock if free, or check it is still ours; blocking (call it in a thread)."""

    def release(self) -> None: ...


class FileLeadership:
    """flock on `path`: one holder among the processes of one host."""

    blocking = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False
        self._file: IO[bytes] | None = None

    def try_hold(self) -> bool:
        if self.held:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._file, self.held = handle, True
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
        self._file, self.held = None, False


class PostgresLeadership:
    """A session advisory lock on its own connection: one holder among every replica of a database."""

    blocking = True

    def __init__(self, url: str, role: str) -> None:
        self.url = url
        self.key = zlib.crc32(f"lorag-leader:{role}".encode())
        self.held = False
        self._conn: psycopg.Connection[Any] | None = None

    def try_hold(self) -> bool:
        try:
            if self._conn is None or self._conn.closed:
                self.held = False
                self._conn = connect(self.url)
            if self.held:
                self._conn.execute("SELECT 1")  # still our session, so still our lock
            else:
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
                self.held = bool(row and row[0])
        except Exception as err:  # the database is gone (or refused us): so is the lock
            log.warning("leader_check_failed", error=describe(err))
            self._drop()
        return self.held

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn, self.held = None, False

    def release(self) -> None:
        self._drop()  # the session's end releases the lock


class AlwaysLeader:
    """A process alone: it leads without a lock."""

    held = True
    blocking = False

    def try_hold(self) -> bool:
        return True

    def release(self) -> None:
        pass


class LeaderKeeper:
    """Tries the lock every `interval_s`; says when leadership came or went (`on_change(held)`)."""

    def __init__(self, leadership: Leadership, role: str, interval_s: float) -> None:
        self.leadership = leadership
        self.role = role
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Any] = []

    @property
    def leading(self) -> bool:
        return self.leadership.held

    def on_change(self, callback: Any) -> None:
        self._listeners.append(callback)

    async def start(self) -> None:
        await self.check()
        self._task = asyncio.create_task(self._loop())

    async def check(self) -> bool:
        before = self.leadership.held
        hold = self.leadership.try_hold
        now = await asyncio.to_thread(hold) if self.leadership.blocking else hold()
        if now != before:
            log.info("leader_acquired" if now else "leader_lost", role=self.role, pid=os.getpid())
            for callback in self._listeners:
                callback(now)
        return now

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await asyncio.to_thread(self.leadership.release)


def has_peers(settings: Settings) -> bool:
    """Whether other lorag processes share this one's state and servers (replicas on PostgreSQL,
    `--workers`): then what one removes, another may still be using."""
    return settings.state.backend == "postgres" or settings.server.workers > 1


def fleet_leadership(settings: Settings) -> Leadership:
    """Among every lorag in front of the fleet: the database's lock, or the state directory's."""
    if settings.state.backend == "postgres":
        return PostgresLeadership(settings.state.url, "fleet")
    if settings.server.workers > 1:
        return FileLeadership(settings.state_path / "leader-fleet.lock")
    return AlwaysLeader()


def jobs_leadership(settings: Settings) -> Leadership:
    """Among the processes sharing the job queue: the database's lock (every replica's queue), or
    the state directory's."""
    if settings.state.backend == "postgres":
        return PostgresLeadership(settings.state.url, "jobs")
    if settings.server.workers > 1:
        return FileLeadership(settings.state_path / "leader-jobs.lock")
    return AlwaysLeader()
