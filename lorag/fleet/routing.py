"""Which server answers a request: pure logic over the servers' states, tested on its own.

least_loaded: among the servers that are up and hold the adapter, those within
`affinity_slack` requests in flight (per unit of weight) of the least loaded one are
candidates, and the adapter's *home* among them wins: homes come from weighted rendezvous
hashing of (adapter, server) with bounded loads (no server is home to more than its share of
the adapters), then the next best score. Homes are stable and spread evenly, so each server keeps
seeing the same few adapters (few swaps in and out of its GPU slots) while the slack bounds
how uneven the load may get. Affinity alone makes hot spots and eviction churn
(llm-d-router #709); load alone swaps adapters needlessly when servers hold few at a time.
round_robin: the next server that is up and holds the adapter (the baseline benchmarks use).
Base-model requests go to the least loaded server.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

Policy = Literal["least_loaded", "round_robin"]


@dataclass
class ServerState:
    """What lorag knows about one server; changed only on the event loop."""

    name: str
    weight: float = 1.0
    up: bool = False
    ready: bool = False  # up and reconciled: may take traffic
    in_flight: int = 0
    loaded: set[str] = field(default_factory=set)  # adapter names the server holds
    refused: dict[str, str] = field(default_factory=dict)  # adapter name -> why the server refused it
    # The adapters a server with `hot_slots` GPU slots would hold now (LRU), to count swaps.
    hot: OrderedDict[str, None] = field(default_factory=OrderedDict)
    hot_slots: int = 4
    failures: int = 0  # in a row
    resting_until: float = 0.0
    unreachable: bool = False  # /health went unanswered since the server last answered it
    max_model_len: int | None = None
    base_id: str | None = None  # the name the server serves the base model under
    error: str | None = None
    # Counters for /metrics.
    load_failures: int = 0
    repairs: int = 0
    requests: int = 0
    adapter_loads: int = 0  # times an adapter came into this server's hot set

    def routable(self, now: float) -> bool:
        return self.up and self.ready and now >= self.resting_until

    def holds(self, adapter: str | None) -> bool:
        return adapter is None or (adapter in self.loaded and adapter not in self.refused)

    def load(self) -> float:
        return self.in_flight / self.weight

    def served(self, adapter: str | None) -> None:
        """Count a request, and the adapter swaps a server with `hot_slots` slots would make."""
        self.requests += 1
        if adapter is None:
            return
        if adapter in self.hot:
            self.hot.move_to_end(adapter)
            return
        self.adapter_loads += 1
        self.hot[adapter] = None
        while len(self.hot) > self.hot_slots:
            self.hot.popitem(last=False)

    def failed(self, error: str, backoff_s: float, max_backoff_s: float) -> None:
        """A request or health check failed: rest, longer each time in a row."""
        self.failures += 1
        self.error = error
        self.resting_until = time.monotonic() + min(max_backoff_s, backoff_s * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures = 0
        self.error = None
        self.resting_until = 0.0

    def went_away(self, error: str) -> None:
        """A health check (or the model list) got no answer: no traffic until it answers again."""
        self.up = self.ready = False
        self.error = error
        self.unreachable = True

    def came_back(self) -> None:
        """/health answers. After a spell with no answer this is a new process (a restart): the old
        one's failures and rest are not held against it, or a server restarted within
        max_backoff_s of its death would sit reconciled and idle. A server that kept answering
        /health while its requests failed keeps its back-off."""
        self.up = True
        if self.unreachable:
            self.unreachable = False
            self.succeeded()

    def resting_s(self, now: float) -> float:
        return max(0.0, self.resting_until - now)


class Picker:
    def __init__(self, policy: Policy, affinity_slack: float, everywhere: str | None = None) -> None:
        self.policy = policy
        self.slack = affinity_slack
        self.everywhere = everywhere  # an adapter every request may use (the null adapter): no home
        self.homes: dict[str, str] = {}  # adapter -> home server (`assign`)
        self._turn = 0

    def pick(self, servers: list[ServerState], adapter: str | None,
             exclude: set[str] | frozenset[str] = frozenset()) -> ServerState | None:
        """The server for one request, or None when no server that is up holds the adapter."""
        now = time.monotonic()
        able = [s for s in servers if s.name not in exclude and s.routable(now) and s.holds(adapter)]
        if not able:
            return None
        if self.policy == "round_robin":
            self._turn += 1
            return able[(self._turn - 1) % len(able)]
        least = min(s.load() for s in able)
        if adapter is None or adapter == self.everywhere:
            return min(able, key=lambda s: (s.load(), s.requests / s.weight))
        near = [s for s in able if s.load() <= least + self.slack]
        home = self.homes.get(adapter)
        return max(near, key=lambda s: (s.name == home, home_score(adapter, s.name, s.weight)))

    def assign(self, adapters: list[str], servers: list[ServerState]) -> None:
        """Give every adapter a home: its highest-scoring server that does not hold its share yet
        (rendezvous hashing with bounded loads), so homes are stable and evenly spread."""
        total = sum(s.weight for s in servers) or 1.0
        share = {s.name: math.ceil(len(adapters) * s.weight / total) for s in servers}
        taken = dict.fromkeys(share, 0)
        homes: dict[str, str] = {}
        for adapter in sorted(adapters):
            ranked = sorted(servers, key=lambda s: home_score(adapter, s.name, s.weight), reverse=True)
            home = next((s.name for s in ranked if taken[s.name] < share[s.name]), None)
            if home is not None:
                homes[adapter] = home
                taken[home] += 1
        self.homes = homes


def home_score(adapter: str, server: str, weight: float) -> float:
    """Weighted rendezvous hashing: the server with the highest score is the adapter's home."""
    digest = hashlib.blake2b(f"{adapter}|{server}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)  # in (0, 1)
    return weight / -math.log(unit)
