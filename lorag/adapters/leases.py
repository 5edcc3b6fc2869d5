"""Leases: which adapter versions requests still need, so removing one never pulls it from under them.

A request takes a lease on its adapter version when it is resolved and gives it back after
its last token (the pipeline), and the engine takes one more around each generation. An
admin's remove *retires* the version: it is unloaded and its files deleted only once the
last lease is given back. vLLM loads an adapter's files when a request first needs it; a
version whose files went away between resolve and generate killed the engine core
(FileNotFoundError in the worker, then EngineDeadError for every request).

One instance per engine, used on its event loop only (no locks); lorag.engine.Engine and
lorag.fleet keep one each, and tests/echo_engine.py too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorag.adapters.registry import AdapterVersion

if TYPE_CHECKING:
    from lorag.config import Settings

REMOVAL_MARGIN_S = 30.0  # beyond a request's deadline: a replica that learns of a removal late
NO_DEADLINE_GRACE_S = 3600.0  # requests without a generation deadline


def removal_grace_s(settings: Settings) -> float:
    """How long a removed version stays usable when replicas share it (loaded on the fleet's
    servers, its files on the shared directory): another replica's request that resolved it just
    before the removal may run until its deadline."""
    timeout = settings.server.limits.generation_timeout_s
    return timeout + REMOVAL_MARGIN_S if timeout else NO_DEADLINE_GRACE_S

# Called once a retired version has no lease left: (the version, the caller's on_released or None).
Release = Callable[[AdapterVersion, Callable[[], Any] | None], None]


@dataclass
class _Held:
    adapter: AdapterVersion
    count: int = 0
    retired: bool = False
    on_released: Callable[[], Any] | None = None


class Lease:
    """One hold on an adapter version (or on nothing, for the base model); give it back once."""

    def __init__(self, leases: AdapterLeases | None, key: int | None) -> None:
        self._leases = leases
        self._key = key

    def release(self) -> None:
        """Idempotent: the second call (a safety net after the first) does nothing."""
        leases, self._leases = self._leases, None
        if leases is not None and self._key is not None:
            leases._give_back(self._key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


NO_LEASE = Lease(None, None)


class AdapterLeases:
    """Lease counts per adapter version (by lora_int_id, never reused), and retirements."""

    def __init__(self, release: Release) -> None:
        self._release = release
        self._held: dict[int, _Held] = {}

    def hold(self, adapter: AdapterVersion | None) -> Lease:
        """A lease on `adapter` (None: the base model, nothing to hold)."""
        if adapter is None:
            return NO_LEASE
        held = self._held.setdefault(adapter.lora_int_id, _Held(adapter))
        held.count += 1
        return Lease(self, adapter.lora_int_id)

    def retire(self, adapter: AdapterVersion, on_released: Callable[[], Any] | None = None) -> None:
        """Release the version now if nothing holds it, else when the last lease is given back."""
        held = self._held.setdefault(adapter.lora_int_id, _Held(adapter))
        held.retired = True
        held.on_released = on_released
        if held.count == 0:
            self._finish(adapter.lora_int_id)

    def holds(self, ref: str) -> bool:
        """Whether a lease is out on the version with this `name@version` (the fleet's servers name them so)."""
        return any(held.count and held.adapter.ref == ref for held in self._held.values())

    def retired(self, adapter: AdapterVersion) -> bool:
        held = self._held.get(adapter.lora_int_id)
        return held is not None and held.retired

    def _give_back(self, key: int) -> None:
        held = self._held[key]
        held.count -= 1
        if held.count == 0:
            if held.retired:
                self._finish(key)
            else:
                del self._held[key]

    def _finish(self, key: int) -> None:
        held = self._held.pop(key)
        self._release(held.adapter, held.on_released)
