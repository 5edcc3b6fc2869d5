"""A validator that takes `seconds` per answer (an LLM-Guard-style scanner does 0.2-0.25 s on a GPU)."""

import time
from typing import Any

from lorag.plugins import PluginContext, hookimpl


@hookimpl
def output_complete(text: str, ctx: PluginContext) -> Any:
    time.sleep(float((ctx.settings or {}).get("seconds", 1.5)))
    return None
