"""A training line passes the domain's input guards again before it is written: text that would be
redacted or refused at the door must not enter the weights through the back (a corrected answer,
a teacher's reply, a sampled answer)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorag.plugins.host import ContentBlocked
from lorag.serving.jobs import new_request_id

if TYPE_CHECKING:
    from lorag.serving.pipeline import Pipeline


async def guarded(pipeline: Pipeline, scope: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The messages as the input hooks of `scope` (a domain, or a model name) let them through; None if refused."""
    hooks = pipeline.plugins.for_request(request_id=new_request_id("data"), domain=scope)
    if not hooks.plugins:
        return messages
    try:
        return await hooks.arequest_received([dict(m) for m in messages])
    except ContentBlocked:
        return None


async def guarded_record(pipeline: Pipeline, scope: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """A supervised or preference line with every message guarded; None when any part is refused."""
    if "messages" in record:
        messages = await guarded(pipeline, scope, record["messages"])
        return None if messages is None else {**record, "messages": messages}
    prompt = record["input"]["messages"]
    outputs = record["preferred_output"] + record["non_preferred_output"]
    checked = await guarded(pipeline, scope, [*prompt, *outputs])
    if checked is None:
        return None
    cut = len(prompt)
    return {**record, "input": {**record["input"], "messages": checked[:cut]},
            "preferred_output": checked[cut:cut + 1], "non_preferred_output": checked[cut + 1:]}
