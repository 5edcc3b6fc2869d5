"""An input hook slower than any sane timeout: the request must fail closed, quickly."""

import time

from lorag.plugins import PluginContext, hookimpl


@hookimpl
def request_received(ctx: PluginContext) -> None:
    time.sleep(float((ctx.settings or {}).get("seconds", 30)))
