"""A validator that rejects the first answer and accepts the second, and says how many it took."""

from typing import Any

from lorag.plugins import PluginContext, Verdict, hookimpl


@hookimpl
def request_received(ctx: PluginContext) -> None:
    ctx.hold_output()


@hookimpl
def output_complete(ctx: PluginContext) -> Verdict | None:
    if ctx.attempt == 0:
        return Verdict.retry("Try again, please.")
    return None


@hookimpl
def format_output(text: str, response: dict[str, Any], ctx: PluginContext) -> tuple[str, dict[str, Any]]:
    response.setdefault("lorag", {})["attempts"] = ctx.attempt + 1
    return text, response
