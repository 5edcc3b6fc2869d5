"""`[engine] backend = "remote"`: the vLLM OpenAI servers lorag sends generation to, and how it
watches them. Settings only (imported by lorag.config); the fleet itself is lorag.fleet.engine."""

from __future__ import annotations

import os
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from lorag.schema import Strict


class FleetServer(Strict):
    """One vLLM OpenAI server, started with `--enable-lora` and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True so lorag can load and unload adapters on it."""

    url: str = Field(description="Base URL, e.g. http://10.0.0.5:8000 (without /v1).")
    name: str | None = Field(default=None, description="In metrics and status; default: host:port.")
    api_key: str | None = Field(default=None, description="The server's --api-key, if it has one.")
    api_key_env: str | None = Field(default=None, description="An environment variable holding the api key.")
    weight: float = Field(default=1.0, gt=0, description="Relative capacity: in-flight requests are divided by it.")
    # Adapter files must be readable by the server: a local path starting with a key is sent
    # with that prefix replaced (e.g. {"/srv/lorag/state" = "/mnt/lorag-state"}).
    path_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("expected an http(s) URL such as http://127.0.0.1:8000")
        return value.rstrip("/").removesuffix("/v1")

    @property
    def label(self) -> str:
        return self.name or urlsplit(self.url).netloc

    def key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or self.api_key
        return self.api_key

    def server_path(self, local_path: str) -> str:
        """The path this server reads a local adapter folder at (the longest matching prefix wins)."""
        for prefix in sorted(self.path_map, key=len, reverse=True):
            if local_path == prefix or local_path.startswith(prefix.rstrip("/") + "/"):
                return self.path_map[prefix] + local_path[len(prefix.rstrip("/")):]
        return local_path


class FleetSettings(Strict):
    """How lorag watches, repairs and chooses among the servers."""

    routing: Literal["least_loaded", "round_robin"] = "least_loaded"
    # least_loaded: the adapter's home server (rendezvous hashing) wins while it has at most
    # this many more requests in flight (per unit of weight) than the least loaded server.
    affinity_slack: float = Field(default=4.0, ge=0)
    # GPU adapter slots per server, for counting adapter swaps in status and metrics
    # (lorag's LRU model of them; vLLM exposes no count); default: engine.max_loras.
    affinity_slots: int | None = Field(default=None, ge=1)
    health_interval_s: float = Field(default=2.0, gt=0)
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Tokens per chunk a server streams to lorag (vLLM's per-request stream_interval; the first
    # and last chunks come at once): above 1, both hops spend less per token, clients get coarser chunks.
    stream_interval: int = Field(default=1, ge=1, le=64)
    # A request that fails before its first token is tried on up to this many other servers.
    retries: int = Field(default=2, ge=0)
    # After a failure a server rests this long, doubling up to max_backoff_s while it keeps failing.
    backoff_s: float = Field(default=1.0, gt=0)
    max_backoff_s: float = Field(default=30.0, gt=0)
    # A request that finds no server up for it (all resting or restarting) waits this long for one
    # before a 503; the request's own generation deadline still applies.
    wait_for_server_s: float = Field(default=30.0, ge=0)
    # Idle connections to a server are closed after this long: below the server's own keep-alive
    # (vLLM's is 5 s, VLLM_HTTP_TIMEOUT_KEEP_ALIVE), so lorag rarely writes to one the server closed.
    keepalive_s: float = Field(default=4.0, gt=0)
    # Several lorags in front of the fleet: an adapter none of them wants any more (removed, or
    # never registered) stays loaded this long before the leader unloads it, since a request
    # through another replica may still use it. Default: server.limits.generation_timeout_s + 30.
    unload_grace_s: float | None = Field(default=None, ge=0)


def check_servers(backend: str, servers: list[FleetServer]) -> None:
    """The remote backend needs servers, each with its own name."""
    if backend == "remote" and not servers:
        raise ValueError('backend = "remote" needs at least one [[engine.servers]] entry')
    labels = [s.label for s in servers]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"servers: the name {twice[0]!r} is used twice (give each server its own name)")



