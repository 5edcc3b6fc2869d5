"""Critical sections of the manifest protocol: no Ctrl-C in the middle of one.

Python raises KeyboardInterrupt at whatever bytecode the main thread runs when SIGINT
arrives, including between marking documents "writing" and committing them, or inside
a Chroma client call. A section entered here holds SIGINT back and re-delivers it once
the section is over, so a document group is written (or rolled back) whole and the
interrupt then stops ingestion between groups. Sections are kept short: embedding
happens before one is entered.

Only the main thread receives signals (and may set handlers), so elsewhere this is a
no-op; SIGKILL and crashes are covered by `manifest.recover` on the next open.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run the body with SIGINT held back; a SIGINT that came meanwhile is re-raised after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN / SIG_DFL / None: Python raises nothing to defer
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            signal.raise_signal(signal.SIGINT)  # the restored handler now runs (KeyboardInterrupt)
