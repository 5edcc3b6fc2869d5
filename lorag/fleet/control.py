"""lorag as the fleet's control plane: which server is up, which adapters each one holds, and
the repairs that keep every server holding every registered adapter.

The registry stays lorag's: each version it registers is loaded on every server that is up
(`load_adapter`), a removed one is unloaded from a server once no request there uses it
(`retire_adapter`), and a reconcile pass — at start, when a server comes back, and every
`reconcile_interval_s` — compares a server's /v1/models with what it should hold and repairs
the difference. vLLM's own runtime loading reaches one replica and does not survive its
restart (vllm-project/vllm #12174); this is the part that makes it a fleet. A server that
refuses an adapter is reported and gets no traffic for it. Health comes from /health every
`health_interval_s` and from request failures, with back-off.

Several lorags may stand in front of one fleet (replicas sharing PostgreSQL, `--workers`). Then
one of them leads (lorag.state.leader): only the leader repairs servers and unloads, from the
shared registry it re-reads before each pass, and an adapter nobody wants any more stays loaded
for `unload_grace_s` first, since a request on another replica may still be using it. Followers
only read what each server holds; one loads an adapter itself only when no server holds it yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from lorag.adapters.leases import AdapterLeases, Lease, removal_grace_s
from lorag.errors import LoragError
from lorag.fleet.client import ServerClient, ServerError
from lorag.fleet.routing import Picker, ServerState
from lorag.logging import get_logger
from lorag.state.leader import LeaderKeeper, fleet_leadership, has_peers

if TYPE_CHECKING:
    from lorag.adapters.registry import AdapterRegistry, AdapterVersion
    from lorag.config import Settings

log = get_logger("lorag.fleet")
ADMIN_TIMEOUT_S = 30.0  # loading an adapter reads its weights: give it time


class AdapterRefused(LoragError):
    status_code = 400
    code = "adapter_refused"


class FleetControl:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fleet = settings.engine.fleet
        slots = self.fleet.affinity_slots or settings.engine.max_loras
        self.clients = {s.label: ServerClient(s, self.fleet.connect_timeout_s, self.fleet.keepalive_s) for s in settings.engine.servers}
        self.states = {s.label: ServerState(s.label, s.weight, hot_slots=slots) for s in settings.engine.servers}
        self.picker = Picker(self.fleet.routing, self.fleet.affinity_slack)
        self.desired: dict[str, str] = {}  # adapter name on the servers -> local path
        self.null_name: str | None = None  # base requests go through it where the engine needs it
        self._in_use: dict[tuple[str, str], int] = defaultdict(int)  # (server, adapter) -> requests there
        self.leases = AdapterLeases(self._retired_unused)  # requests from resolve to last token, any server
        self._retired: dict[str, Callable[[], Any] | None] = {}  # no longer held: unload, then call back
        self._locks = {name: asyncio.Lock() for name in self.states}
        self._tasks: list[asyncio.Task[None]] = []
        self._unloads: set[asyncio.Task[None]] = set()  # fire-and-forget, but referenced until done
        self._opened = False
        self.shared = has_peers(settings)  # other lorags in front of the same servers
        self.keeper = LeaderKeeper(fleet_leadership(settings), "fleet", self.fleet.health_interval_s)
        self.registry: AdapterRegistry | None = None  # set by the server: the leader follows it
        self._local_only: set[str] = set()  # loaded here, never registered (a fine-tuning canary)
        self._unwanted: dict[tuple[str, str], float] = {}  # (server, adapter) held but not wanted -> since

    # -- life cycle --------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._opened

    @property
    def alive(self) -> bool:
        """lorag itself keeps running when servers go away; /ready says whether any is usable."""
        return self._opened

    @property
    def leading(self) -> bool:
        return self.keeper.leading

    @property
    def unload_grace_s(self) -> float:
        """How long an adapter no replica wants stays loaded: the longest a request elsewhere may run."""
        if self.fleet.unload_grace_s is not None:
            return self.fleet.unload_grace_s
        return removal_grace_s(self.settings)

    @property
    def loaded_adapters(self) -> int:
        return len([name for name in self.desired if name != self.null_name])

    async def open(self) -> None:
        """First health check and reconcile of every server, then the loops that keep them."""
        from lorag.engine import NULL_ADAPTER_NAME, write_null_adapter_for

        if self.settings.engine.base_via_null_adapter != "off":
            # lorag cannot see a server's device: a base request goes through the null adapter,
            # which keeps it isolated from adapters in the same batch wherever the engine needs that.
            self.desired[NULL_ADAPTER_NAME] = str(await asyncio.to_thread(write_null_adapter_for, self.settings))
            self.null_name = self.picker.everywhere = NULL_ADAPTER_NAME
        await self.keeper.start()  # before the first pass: the leader repairs, followers read
        self.keeper.on_change(self._leadership_changed)
        await asyncio.gather(*(self.check(name) for name in self.states))
        self._tasks = [asyncio.create_task(self._every(self.fleet.health_interval_s, self.check)),
                       asyncio.create_task(self._every(self.fleet.reconcile_interval_s, self.reconcile))]
        self._opened = True
        log.info("fleet_open", servers={s.name: s.up for s in self.states.values()}, null_adapter=self.null_name,
                 leader=self.leading)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self._opened = False
        await self.keeper.stop()
        await asyncio.gather(*(client.close() for client in self.clients.values()), return_exceptions=True)

    def _leadership_changed(self, leading: bool) -> None:
        """A new leader repairs every server now, not at the next interval."""
        if leading:
            self._background(self._reconcile_all())

    async def _reconcile_all(self) -> None:
        await asyncio.gather(*(self.reconcile(name) for name in self.states), return_exceptions=True)

    async def _every(self, interval_s: float, step: Callable[[str], Any]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.gather(*(step(name) for name in self.states), return_exceptions=True)

    # -- health ------------------------------------------------------------------------

    async def check(self, name: str) -> None:
        """Ask a server's /health; a server that is back is reconciled before it takes traffic."""
        state = self.states[name]
        try:
            await self.clients[name].health(self.fleet.connect_timeout_s)
        except ServerError as err:
            if state.up:
                log.warning("server_down", server=name, error=str(err))
            state.went_away(str(err))
            return
        if not state.up:
            state.came_back()
            log.info("server_up", server=name)
        if not state.ready:
            await self.reconcile(name)

    def mark_failed(self, state: ServerState, error: ServerError) -> None:
        """A request failed on the server's side: rest it. A server that did not answer at all (or
        failed twice in a row) is down until /health says otherwise, and then reconciled first:
        a restarted server has lost its adapters."""
        state.failed(str(error), self.fleet.backoff_s, self.fleet.max_backoff_s)
        if error.status == 0 or state.failures >= 2:
            state.up = state.ready = False

    def mark_lost(self, state: ServerState, name: str | None, error: str) -> None:
        """The server does not know a model it should hold: no traffic until reconciled again."""
        log.warning("server_lost_adapter", server=state.name, adapter=name, error=error)
        if name is not None:
            state.loaded.discard(name)
        state.ready = False  # the next health check reconciles it

    def mark_succeeded(self, state: ServerState) -> None:
        state.succeeded()

    # -- adapters ----------------------------------------------------------------------

    def _assign_homes(self) -> None:
        self.picker.assign([a for a in self.desired if a != self.null_name], list(self.states.values()))

    async def load_adapter(self, adapter: AdapterVersion) -> None:
        """Load on every server that is up and does not hold it yet; refused by all of them is an
        error, by some a report."""
        self.desired[adapter.ref] = adapter.path
        self._retired.pop(adapter.ref, None)
        self._assign_homes()
        if self.shared and self.registry is not None and not await self._registered(adapter.ref):
            self._local_only.add(adapter.ref)  # the leader must not take it for a removed version
        up = [s for s in self.states.values() if s.up]
        await asyncio.gather(*(self._load(s, adapter.ref, adapter.path) for s in up if not s.holds(adapter.ref)))
        if up and not any(s.holds(adapter.ref) for s in up):
            del self.desired[adapter.ref]
            self._assign_homes()
            reasons = "; ".join(f"{s.name}: {s.refused.get(adapter.ref)}" for s in up)
            raise AdapterRefused(f"No model server could load {adapter.ref}: {reasons}")

    def hold(self, adapter: AdapterVersion | None) -> Lease:
        """A request's lease on its adapter version, from resolve to its last token: while any is
        out, no server unloads the version (the request may still go to any of them)."""
        return self.leases.hold(adapter)

    def retire_adapter(self, adapter: AdapterVersion, on_released: Callable[[], Any] | None = None) -> None:
        """Route no new request to it; once no request holds it, unload it everywhere, then `on_released()`."""
        self.desired.pop(adapter.ref, None)
        self._local_only.discard(adapter.ref)
        self._assign_homes()
        self.leases.retire(adapter, on_released)

    def needs_loading(self, adapter: AdapterVersion) -> bool:
        """A version this process has not loaded (registered elsewhere, or before it started) that no
        server holds yet: loading it now beats waiting for the leader's next pass."""
        if adapter.ref in self.desired or self.leases.retired(adapter):
            return False
        held = any(s.up and s.holds(adapter.ref) for s in self.states.values())
        if held:
            self.desired[adapter.ref] = adapter.path
            self._assign_homes()
        return not held

    async def _registered(self, ref: str) -> bool:
        registry = self.registry
        assert registry is not None
        return ref in {v.ref for v in await asyncio.to_thread(registry.all_versions)}

    def _retired_unused(self, adapter: AdapterVersion, on_released: Callable[[], Any] | None) -> None:
        self._retired[adapter.ref] = on_released
        self._release_unused(adapter.ref)

    async def _load(self, state: ServerState, name: str, path: str) -> bool:
        try:
            await self.clients[state.name].load_adapter(name, path, ADMIN_TIMEOUT_S)
        except ServerError as err:
            if err.status == 400 and "already been loaded" in str(err):
                state.loaded.add(name)
                state.refused.pop(name, None)
                return True
            state.refused[name] = str(err).split(": ", 1)[-1]
            state.load_failures += 1
            log.error("adapter_refused", server=state.name, adapter=name, error=str(err))
            return False
        state.loaded.add(name)
        state.refused.pop(name, None)
        log.info("adapter_loaded_remote", server=state.name, adapter=name)
        return True

    def _release_unused(self, name: str) -> None:
        """Unload a retired adapter from the servers where no request uses it; all done: call back.
        Shared by several lorags, the leader unloads it after `unload_grace_s` instead."""
        if name not in self._retired:
            return
        for state in self.states.values():
            if not self.shared and name in state.loaded and not self._in_use.get((state.name, name)):
                state.loaded.discard(name)
                self._background(self._unload(state, name))
        if not any(self._in_use.get((s, name)) for s in self.states):
            callback = self._retired.pop(name)
            if callback is not None:
                self._background(asyncio.to_thread(callback))  # rmtree: not on the event loop

    def _background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _unload(self, state: ServerState, name: str) -> None:
        try:
            await self.clients[state.name].unload_adapter(name, ADMIN_TIMEOUT_S)
            log.info("adapter_unloaded_remote", server=state.name, adapter=name)
        except ServerError as err:  # a server that is down has lost it anyway; reconcile covers the rest
            log.warning("adapter_unload_failed", server=state.name, adapter=name, error=str(err))

    @contextlib.asynccontextmanager
    async def lease(self, state: ServerState, name: str | None) -> AsyncIterator[None]:
        """A request on a server: counted for routing, and keeping its adapter loaded there."""
        state.in_flight += 1
        state.served(name)
        if name is not None:
            self._in_use[(state.name, name)] += 1
        try:
            yield
        finally:
            state.in_flight -= 1
            if name is not None:
                self._in_use[(state.name, name)] -= 1
                if not self._in_use[(state.name, name)]:
                    del self._in_use[(state.name, name)]
                    self._release_unused(name)

    # -- reconcile ---------------------------------------------------------------------

    async def reconcile(self, name: str) -> None:
        """Make one server hold exactly the adapters it should: load the missing, unload the extra.
        A follower only reads what the server holds; the leader repairs."""
        state = self.states[name]
        if not state.up:
            return
        async with self._locks[name]:
            try:
                cards = await self.clients[name].models(self.fleet.connect_timeout_s)
            except ServerError as err:
                state.went_away(str(err))
                return
            base = next((c for c in cards if not c.get("parent")), {})
            state.base_id = base.get("id")
            state.max_model_len = base.get("max_model_len") or state.max_model_len
            held = {str(c["id"]) for c in cards if c.get("parent")}
            if not self.leading:
                state.loaded = held
                state.ready = True
                return
            if self.shared:
                await self._follow_registry()
            repairs = 0
            for adapter, path in list(self.desired.items()):
                if adapter not in held:
                    repairs += await self._load(state, adapter, path)
            extra = self._unload_due(name, [a for a in held if a not in self.desired
                                            and not self._in_use.get((name, a)) and not self.leases.holds(a)])
            for adapter in extra:
                await self._unload(state, adapter)
            repairs += len(extra)
            state.loaded = (held | {a for a in self.desired if a not in state.refused}) - set(extra)
            if repairs:
                state.repairs += repairs
                log.info("server_reconciled", server=name, repairs=repairs, loaded=len(state.loaded))
            state.ready = True

    async def _follow_registry(self) -> None:
        """The leader's view of what servers should hold: every registered version (plus what this
        process loaded unregistered); a version removed through another replica leaves it."""
        registry = self.registry
        if registry is None:
            return
        registered = {v.ref: v.path for v in await asyncio.to_thread(registry.all_versions)}
        before = set(self.desired)
        for ref, path in registered.items():
            self.desired.setdefault(ref, path)
        for ref in list(self.desired):
            if ref != self.null_name and ref not in registered and ref not in self._local_only:
                del self.desired[ref]
        if set(self.desired) != before:
            self._assign_homes()

    def _unload_due(self, server: str, extra: list[str]) -> list[str]:
        """The extra adapters to unload now: all of them when lorag is alone; shared, those extra
        for `unload_grace_s` (a request through another replica may still use one)."""
        if not self.shared:
            return extra
        now = time.monotonic()
        for key in [k for k in self._unwanted if k[0] == server and k[1] not in extra]:
            del self._unwanted[key]
        since = {a: self._unwanted.setdefault((server, a), now) for a in extra}
        due = [a for a in extra if now - since[a] >= self.unload_grace_s]
        for adapter in due:
            del self._unwanted[(server, adapter)]
        return due

    # -- status ------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Per server: up, ready, resting after failures, load, adapters held and refused, counters
        (admin API, `lorag fleet status`)."""
        now = time.monotonic()
        return [{
            "name": s.name, "url": self.clients[s.name].server.url, "up": s.up, "ready": s.ready,
            "resting_s": round(s.resting_s(now), 1),
            "in_flight": s.in_flight, "weight": s.weight, "requests": s.requests,
            "adapters": sorted(a for a in s.loaded if a != self.null_name),
            "refused": dict(s.refused), "load_failures": s.load_failures, "repairs": s.repairs,
            "adapter_loads": s.adapter_loads, "error": s.error, "max_model_len": s.max_model_len,
        } for s in self.states.values()]


def fleet_status(engine: object) -> list[dict[str, Any]] | None:
    """Per-server status when `engine` is a fleet, else None (the admin API, /ready and /metrics ask)."""
    return engine.status() if isinstance(engine, FleetControl) else None
