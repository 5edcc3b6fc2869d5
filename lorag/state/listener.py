"""Change notifications from PostgreSQL (LISTEN/NOTIFY) for a process's caches.

A writer NOTIFYs a channel in the transaction that changes a table; every process LISTENs on
its own connection, in a daemon thread, and counts what it heard per channel. A cache compares
the count with the one it loaded at and re-reads when it moved. Notifications sent while the
connection is down are lost, so every (re)connect counts as a change on every channel: after a
cut, caches re-read everything, never trust what they held.
"""

from __future__ import annotations

import threading
import time

import psycopg

from lorag.logging import get_logger
from lorag.state.database import describe

log = get_logger("lorag.state")
RETRY_S = (0.2, 0.5, 1.0, 2.0)  # waits between reconnects (the last one repeats)
APPLICATION = "lorag-listener"  # application_name of the listening connection
WAIT_S = 1.0  # longest wait for notifications between two looks at stop()


class ChangeListener:
    """LISTENs on `channels` until stop(); generation(channel) counts the changes heard."""

    def __init__(self, url: str, channels: tuple[str, ...]) -> None:
        self.url = url
        self.channels = channels
        self._generations = dict.fromkeys(channels, 0)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorag-state-listener", daemon=True)
        self._thread.start()

    def generation(self, channel: str) -> int:
        with self._lock:
            return self._generations[channel]

    def stop(self) -> None:
        """The thread ends within WAIT_S (it checks between waits for notifications)."""
        self._stopped.set()

    def _bump(self, *channels: str) -> None:
        with self._lock:
            for channel in channels:
                self._generations[channel] += 1

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, application_name=APPLICATION,
                                     connect_timeout=10) as conn:
                    for channel in self.channels:
                        conn.execute(f'LISTEN "{channel}"')
                    self._bump(*self.channels)  # what was missed while disconnected: re-read everything
                    if failures:
                        log.info("state_listener_reconnected", channels=list(self.channels))
                    failures = 0
                    while not self._stopped.is_set():
                        for notify in conn.notifies(timeout=WAIT_S):
                            self._bump(notify.channel)
            except psycopg.Error as err:
                if self._stopped.is_set():
                    break
                if not failures:
                    log.warning("state_listener_lost", error=describe(err))
                self._bump(*self.channels)  # anything cached may be stale from now on
                time.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                failures += 1
