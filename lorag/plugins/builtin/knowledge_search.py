"""The built-in `search_knowledge` tool: the model searches its domain's knowledge bases itself.

A tool like any plugin's, registered through `register_tools`; it reads the domain's search
from the request context, so it answers with that domain's bases, settings and access rules.
Built-in tools are offered to every domain; a domain turns this one on with
`[domains.<name>.tools] enabled = ["search_knowledge"]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorag.plugins.hookspecs import hookimpl
from lorag.plugins.types import PluginContext  # at run time: the tool schema reads the type hints


def search_knowledge(query: str, top_k: int | None = None, *, ctx: PluginContext) -> list[dict[str, Any]]:
    """Search this domain's knowledge bases; returns the best passages with their sources."""
    if ctx.search_knowledge is None:
        return []
    return ctx.search_knowledge(query, top_k)


@hookimpl
def register_tools(register: Callable[..., None]) -> None:
    register(search_knowledge)
