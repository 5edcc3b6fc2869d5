"""OpenAI's cursor pagination, one way for every list that has it (files, fine-tuning jobs, events).

A page is `{"object": "list", "data", "has_more", "first_id", "last_id"}`; the next page starts
after the id the client names (`after`), so pages stay consistent while new items arrive.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lorag.errors import LoragError, NotFoundError


def check_limit(limit: int, maximum: int) -> int:
    """`limit` itself when it lies in 1..maximum, else a 400 naming the param."""
    if not 1 <= limit <= maximum:
        raise LoragError(f"limit must be between 1 and {maximum}; got {limit}.", param="limit", code="invalid_value")
    return limit


def metadata_filter(query: Iterable[tuple[str, str]]) -> dict[str, str]:
    """`metadata[key]=value` query parameters (how the openai SDK sends a metadata filter) as a dict."""
    return {key[len("metadata["):-1]: value for key, value in query
            if key.startswith("metadata[") and key.endswith("]")}


def page_of(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list page around `data` (items with an "id"), in the order given."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def cursor_page(items: Sequence[dict[str, Any]], *, after: str | None, limit: int) -> dict[str, Any]:
    """The page of `items` (already in the order to return, each with an "id") after `after`, at most `limit`.

    An `after` that is not among the items is a 404, not an empty page: a client paging through
    a list it can no longer see (the item was deleted, or is not its own) should be told so.
    """
    start = 0
    if after is not None:
        for index, item in enumerate(items):
            if item["id"] == after:
                start = index + 1
                break
        else:
            raise NotFoundError(f"No item with id {after!r} to page after: pass the last_id of a previous page.",
                                param="after", code="cursor_not_found")
    return page_of(list(items[start:start + limit]), start + limit < len(items))
