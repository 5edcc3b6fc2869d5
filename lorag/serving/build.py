"""The composition root: the one place the request path is put together from settings.

The server (lorag.server.app), the in-process chat and the evaluator (lorag.serving.local)
all call `build_pipeline`; tests pass a fake engine (tests/echo_engine.py) and their own
knowledge link or plugin host.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from lorag import lanes
from lorag.adapters.leases import Lease
from lorag.adapters.registry import AdapterVersion
from lorag.adapters.registry_pg import open_registry
from lorag.config import Settings
from lorag.knowledge.link import KnowledgeLink
from lorag.plugins.host import PluginHost
from lorag.serving.pipeline import Pipeline

if TYPE_CHECKING:
    from lorag.serving.generation import TextEngine


class ServingEngine(Protocol):
    """What the server needs of an engine beyond the request path's TextEngine: a life cycle,
    health, and the adapters (lorag.engine.Engine in process, lorag.fleet.engine.RemoteEngine
    over vLLM servers)."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def started(self) -> bool: ...

    @property
    def alive(self) -> bool: ...

    @property
    def loaded_adapters(self) -> int: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def check_health(self) -> None: ...

    async def load_adapter(self, adapter: AdapterVersion) -> None: ...

    def retire_adapter(self, adapter: AdapterVersion, on_released: Callable[[], Any] | None = None) -> None: ...

    def hold(self, adapter: AdapterVersion | None) -> Lease: ...

    def generate(self, prompt_token_ids: list[int], params: Any, request_id: str,
                 adapter: AdapterVersion | None) -> AsyncGenerator[Any, None]: ...


def build_engine(settings: Settings) -> ServingEngine:
    """The engine `[engine] backend` names, not started: in process, or a fleet of vLLM servers."""
    if settings.engine.backend == "remote":
        from lorag.fleet.engine import RemoteEngine

        return RemoteEngine(settings)
    from lorag.engine import Engine

    return Engine(settings)


def build_pipeline(settings: Settings, engine: TextEngine | None = None, *,
                   knowledge: KnowledgeLink | None = None, plugins: PluginHost | None = None) -> Pipeline:
    """The pipeline for `settings`: the engine (`build_engine`, not started, unless one is
    given), the adapter registry, a host over the process's plugins and one knowledge link."""
    if engine is None:
        engine = build_engine(settings)
    lanes.configure(settings.threads)
    return Pipeline(settings, engine, open_registry(settings),
                    plugins or PluginHost.from_settings(settings), knowledge or KnowledgeLink(settings))
