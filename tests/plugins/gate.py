"""Stops a request in a hook until the test lets it go: for servers in the test's own process.

A domain sets `settings.gate.input = "<name>"` (request_received) or `output = "<name>"`
(output_complete); the test waits for `gate(name).entered`, does what must happen meanwhile,
then sets `gate(name).opened`. No sleeps: what the tests prove is an order of events.
"""

from __future__ import annotations

import threading
from typing import Any

from lorag.plugins import PluginContext, hookimpl

WAIT_S = 300  # a gate the test never opens fails the request, eventually


class Gate:
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.passed = 0
        self.gave_up = 0  # waits that ended without the gate opening

    def wait(self) -> None:
        self.entered.set()
        if not self.opened.wait(WAIT_S):
            self.gave_up += 1
            raise TimeoutError("the test never opened the gate")
        self.passed += 1


GATES: dict[str, Gate] = {}


def gate(name: str) -> Gate:
    return GATES.setdefault(name, Gate())


@hookimpl
def request_received(ctx: PluginContext) -> None:
    name = (ctx.settings or {}).get("input")
    if name:
        gate(name).wait()


@hookimpl
def output_complete(text: str, ctx: PluginContext) -> Any:
    name = (ctx.settings or {}).get("output")
    if name:
        gate(name).wait()
    return None


def hang(topic: str = "") -> str:
    """Looks something up; waits for the test's "tool" gate (a tool that hangs past its timeout)."""
    gate("tool").wait()
    return f"found {topic}"


@hookimpl
def register_tools(register: Any) -> None:
    register(hang)
