"""The composition root: the one place the request path is put together from settings.

The server (lorag.server.app), the in-process chat and the evaluator (lorag.serving.local)
all call `build_pipeline`; tests pass a fake engine (tests/echo_engine.py) and their own
knowledge link or plugin host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorag.adapters.registry import AdapterRegistry
from lorag.config import Settings
from lorag.knowledge.link import KnowledgeLink
from lorag.plugins.host import PluginHost
from lorag.serving.pipeline import Pipeline

if TYPE_CHECKING:
    from lorag.serving.generation import TextEngine


def build_pipeline(settings: Settings, engine: TextEngine | None = None, *,
                   knowledge: KnowledgeLink | None = None, plugins: PluginHost | None = None) -> Pipeline:
    """The pipeline for `settings`: the engine (lorag.engine.Engine, not started, unless one is
    given), the adapter registry, a host over the process's plugins and one knowledge link."""
    if engine is None:
        from lorag.engine import Engine

        engine = Engine(settings)
    return Pipeline(settings, engine, AdapterRegistry(settings.state_path),
                    plugins or PluginHost.from_settings(settings), knowledge or KnowledgeLink(settings))
