"""Makes the real model emit a chosen text, through vLLM structured output (a regex).

The tiny test model has random weights; forcing its output is how the tests get
e-mail addresses or blocked words into real, token-by-token generations.
"""

import re
from typing import Any

from lorag.plugins import PluginContext, hookimpl

_SPECIAL = re.compile(r"([\\.^$*+?{}\[\]|()])")


def literal(text: str) -> str:
    """A regex matching exactly `text` (re.escape also escapes spaces, which grammar engines refuse)."""
    return _SPECIAL.sub(r"\\\1", text)


@hookimpl
def sampling_params(params: dict[str, Any], ctx: PluginContext) -> dict[str, Any]:
    from vllm.sampling_params import StructuredOutputsParams

    return {**params, "structured_outputs": StructuredOutputsParams(regex=literal(ctx.settings["text"]))}
