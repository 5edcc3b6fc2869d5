"""Stored chat completions (OpenAI's routes) and lorag's feedback on them.

OpenAI: GET /v1/chat/completions (cursor pages; `model`, `metadata[k]=v`, `order`), GET, POST
(metadata only) and DELETE /v1/chat/completions/{id}, GET /v1/chat/completions/{id}/messages.
lorag: POST /v1/chat/completions/{id}/feedback (a rating), GET it back with the preferences
touching the completion, and POST /v1/feedback/preferences (which of two answers to the same
prompt is better). Any key may use them on its own completions; an admin key on every key's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorag.finetune.files import FileStore
from lorag.loop.derived import files_from, forget, without_completion
from lorag.loop.feedback import FeedbackStore
from lorag.loop.settings import check_metadata
from lorag.server.auth import Principal, require_key
from lorag.server.pagination import check_limit, cursor_page, metadata_filter, page_of
from lorag.server.recorder import CompletionRecorder, owner_of, viewer_of

router = APIRouter()
Caller = Annotated[Principal, Depends(require_key)]
MAX_PAGE = 100


def recorder(request: Request) -> CompletionRecorder:
    found: CompletionRecorder = request.app.state.recorder
    return found


def feedback_store(request: Request) -> FeedbackStore:
    found: FeedbackStore = request.app.state.feedback
    return found


class MetadataUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, str] | None

    @field_validator("metadata")
    @classmethod
    def _limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(value)


class RatingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    score: float | None = None
    thumbs: Literal["up", "down"] | None = None
    corrected: str | None = Field(default=None, min_length=1)
    comment: str | None = None


class PreferenceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)
    comment: str | None = None


@router.get("/v1/chat/completions")
async def list_completions(request: Request, caller: Caller, after: str | None = None, limit: int = 20,
                           model: str | None = None, order: Literal["asc", "desc"] = "asc") -> dict[str, Any]:
    store = recorder(request)
    records, more = await store.run(lambda: store.store.page(
        viewer_of(caller), model=model, metadata=metadata_filter(request.query_params.items()), order=order,
        after=after, limit=check_limit(limit, MAX_PAGE)))
    return page_of([record.to_openai() for record in records], more)


@router.get("/v1/chat/completions/{completion_id}")
async def get_completion(completion_id: str, request: Request, caller: Caller) -> dict[str, Any]:
    store = recorder(request)
    record = await store.run(store.store.get, completion_id, viewer_of(caller))
    return record.to_openai()


@router.post("/v1/chat/completions/{completion_id}")
async def update_completion(completion_id: str, request: Request, caller: Caller,
                            body: MetadataUpdate) -> dict[str, Any]:
    """Only `metadata` may change (OpenAI's rule): what was said stays what was said."""
    store = recorder(request)
    record = await store.run(store.store.update_metadata, completion_id, viewer_of(caller), body.metadata or {})
    return record.to_openai()


@router.delete("/v1/chat/completions/{completion_id}")
async def delete_completion(completion_id: str, request: Request, caller: Caller) -> dict[str, Any]:
    """Gone with its feedback, and out of every training file made from it (`lorag.derived_files`)."""
    store = recorder(request)
    files: FileStore = request.app.state.files

    def delete() -> list[str]:
        store.store.delete(completion_id, viewer_of(caller))
        touched = []
        for file_id in files_from(store.store.db, completion_id):
            try:
                content = files.root.joinpath(file_id, "content").read_bytes()
            except FileNotFoundError:
                continue  # the file was deleted since
            kept, dropped = without_completion(content, completion_id)
            if dropped and files.replace_content(file_id, kept):
                touched.append(file_id)
        forget(store.store.db, completion_id)
        return touched

    touched = await store.run(delete)
    return {"id": completion_id, "object": "chat.completion.deleted", "deleted": True,
            "lorag": {"derived_files": touched}}


@router.get("/v1/chat/completions/{completion_id}/messages")
async def completion_messages(completion_id: str, request: Request, caller: Caller, after: str | None = None,
                              limit: int = 20, order: Literal["asc", "desc"] = "asc") -> dict[str, Any]:
    """The conversation as stored (after the input hooks), each message with an id of its own."""
    store = recorder(request)
    record = await store.run(store.store.get, completion_id, viewer_of(caller))
    messages = [{"id": f"{completion_id}-{i}", **message, "content_parts": None}
                for i, message in enumerate(record.messages)]
    if order == "desc":
        messages.reverse()
    return cursor_page(messages, after=after, limit=check_limit(limit, MAX_PAGE))


@router.post("/v1/chat/completions/{completion_id}/feedback")
async def rate_completion(completion_id: str, request: Request, caller: Caller, body: RatingBody) -> dict[str, Any]:
    """This key's rating of the completion; sent again, it replaces the earlier one (same id)."""
    feedback = feedback_store(request)
    rating = await recorder(request).run(lambda: feedback.rate(
        completion_id, owner_of(caller), viewer=viewer_of(caller), score=body.score, thumbs=body.thumbs,
        corrected=body.corrected, comment=body.comment))
    return rating.to_api()


@router.get("/v1/chat/completions/{completion_id}/feedback")
async def completion_feedback(completion_id: str, request: Request, caller: Caller) -> dict[str, Any]:
    """The ratings and preferences about one completion (a key's own; an admin's: everyone's)."""
    feedback = feedback_store(request)
    viewer = viewer_of(caller)

    def gather() -> dict[str, Any]:
        feedback.completions.get(completion_id, viewer)
        return {"object": "chat.completion.feedback", "completion_id": completion_id,
                "ratings": [r.to_api() for r in feedback.ratings([completion_id], viewer)],
                "preferences": [p.to_api() for p in feedback.preferences([completion_id], viewer)]}

    answer: dict[str, Any] = await recorder(request).run(gather)
    return answer


@router.post("/v1/feedback/preferences")
async def prefer(request: Request, caller: Caller, body: Annotated[PreferenceBody, Body()]) -> dict[str, Any]:
    """`chosen` answers the prompt better than `rejected`; the same pair sent again replaces the earlier word."""
    feedback = feedback_store(request)
    preference = await recorder(request).run(lambda: feedback.prefer(
        body.chosen, body.rejected, owner_of(caller), viewer=viewer_of(caller), comment=body.comment))
    return preference.to_api()
