"""Stops a request in its input hook until a file appears: the gate for servers in another process.

Settings: `dir`. The hook touches `<dir>/entered`, then waits for `<dir>/open` (the test
creates it once it has done what must happen meanwhile). No sleeps in the tests: an order.
"""

from __future__ import annotations

import time
from pathlib import Path

from lorag.plugins import PluginContext, hookimpl

WAIT_S = 300


@hookimpl
def request_received(ctx: PluginContext) -> None:
    folder = Path((ctx.settings or {})["dir"])
    (folder / "entered").touch()
    deadline = time.monotonic() + WAIT_S
    while not (folder / "open").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the test never opened the gate")
        time.sleep(0.02)
