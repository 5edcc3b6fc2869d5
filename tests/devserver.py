"""Wait for (and stop) a server process the tests, the demo's tooling or a benchmark started.

One loop for all of them: poll an HTTP probe until it answers 200, and fail with the
tail of the server's log as soon as the process exits or the time is up (a server
that never comes up must not hang a test run or a benchmark).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def wait_for(condition: Callable[[], object], timeout_s: float = 180, what: str = "", poll_s: float = 0.5) -> None:
    """Poll `condition` until it is true; a test waits on the state it needs, not on a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def wait_until_up(process: subprocess.Popen, url: str, log: Path, *, probe: str = "/ready",
                  timeout_s: float = 300, poll_s: float = 1.0) -> None:
    """Return once GET url+probe is 200; otherwise stop the process and raise with its log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            kill_tree(process)  # what it started may live on
            raise RuntimeError(f"server exited with {process.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}{probe}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    kill_tree(process)
    raise RuntimeError(f"server did not answer {probe} within {timeout_s:.0f} s:\n{_tail(log)}")


def stop_process(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM (a server drains), then SIGKILL if it has not exited within `timeout_s`; its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a server and, where it leads a session of its own (`start_new_session`), all it started.

    vLLM's engine core outlives its killed API server: one left starting up after a timed-out
    restart took a core from every later test.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
    process.wait()


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"
