"""Calling one plugin implementation: with a deadline, and failures named.

Built-in plugins are lorag's own code with bounded work (regexes over bounded
windows), so they run inline: a thread hop per output window would cost
throughput. Every other plugin's call runs in a daemon thread with a deadline, so
a hung plugin stalls the caller no longer than the deadline, never blocks the
process from exiting, and a plugin with too many calls stuck is refused at once
instead of piling up threads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lorag.errors import LoragError
from lorag.logging import get_logger
from lorag.plugins.errors import ContentBlocked, PluginError

log = get_logger("lorag.plugins")

MAX_STUCK_PER_PLUGIN = 8


@dataclass(frozen=True)
class Impl:
    """One plugin's implementation of one hook, ready to call."""

    plugin: str
    hook: str
    function: Any
    argnames: tuple[str, ...]
    builtin: bool  # lorag's own plugin (bounded work): called inline, no thread and deadline


class Invoker:
    def __init__(self) -> None:
        self._running: Counter[str] = Counter()
        self._lock = threading.Lock()

    def call(self, impl: Impl, args: dict[str, Any], timeout: float) -> Any:
        """Call with the arguments it asks for; LoragErrors pass through, the rest become PluginError."""
        call_args = [args[name] for name in impl.argnames]
        try:
            if impl.builtin:
                return impl.function(*call_args)
            return self._call_with_deadline(impl, call_args, timeout)
        except ContentBlocked as err:
            err.plugin = err.plugin or impl.plugin
            raise
        except LoragError:
            raise
        except Exception as err:
            log.error("plugin_failed", plugin=impl.plugin, hook=impl.hook, error=repr(err), exc_info=err)
            raise PluginError(
                f"Plugin '{impl.plugin}' failed in {impl.hook}: {type(err).__name__}: {err}. "
                "The request was stopped (plugins fail closed).",
                plugin=impl.plugin, hook=impl.hook,
            ) from err

    def _call_with_deadline(self, impl: Impl, call_args: list[Any], timeout: float) -> Any:
        with self._lock:
            if self._running[impl.plugin] >= MAX_STUCK_PER_PLUGIN:
                raise PluginError(
                    f"Plugin '{impl.plugin}' has {MAX_STUCK_PER_PLUGIN} calls that never finished; "
                    "the request was stopped (plugins fail closed).",
                    plugin=impl.plugin, hook=impl.hook,
                )
            self._running[impl.plugin] += 1
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                outcome["value"] = impl.function(*call_args)
            except BaseException as err:
                outcome["error"] = err
            finally:
                with self._lock:
                    self._running[impl.plugin] -= 1
                done.set()

        started = time.perf_counter()
        threading.Thread(target=run, name=f"lorag-plugin-{impl.plugin}", daemon=True).start()
        if not done.wait(timeout):
            log.error("plugin_timeout", plugin=impl.plugin, hook=impl.hook, timeout_s=timeout,
                      waited_ms=round((time.perf_counter() - started) * 1000, 1))
            raise PluginError(
                f"Plugin '{impl.plugin}' did not finish {impl.hook} within {timeout:g} s; "
                "the request was stopped (plugins fail closed).",
                plugin=impl.plugin, hook=impl.hook,
            )
        error = outcome.get("error")
        if isinstance(error, Exception):
            raise error
        if error is not None:  # SystemExit, KeyboardInterrupt... from a plugin: not ours to obey
            raise RuntimeError(f"raised {type(error).__name__}") from error
        return outcome["value"]
