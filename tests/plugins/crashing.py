"""A filter that crashes on every window: the answer must be blocked, never sent unfiltered."""

from lorag.plugins import hookimpl


@hookimpl
def output_chunk(window: str) -> None:
    raise RuntimeError("filter exploded")
