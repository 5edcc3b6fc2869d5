"""POST /v1/training_data: stored completions turned into a fine-tuning file, stored in the Files API.

The answer names the new file (purpose "fine-tune", the caller's, ready for
`client.fine_tuning.jobs.create(training_file=...)`), the held-out file when a split was asked
for, and what was left out and why. It needs a key with the fine_tune scope; the completions it
reads are the caller's own (an admin's: everyone's). Sampling and teachers run on this server's
pipeline (or the teacher's endpoint), so a large build is a long request: `lorag data build`
waits for it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from lorag.errors import LoragError
from lorag.finetune.files import FileStore
from lorag.improve.answers import Answerer, EndpointAnswerer, PipelineAnswerer
from lorag.improve.data import Built, DataRequest, Sources, build
from lorag.improve.guards import guarded_record
from lorag.logging import get_logger
from lorag.loop.derived import record_derived
from lorag.loop.feedback import FeedbackStore
from lorag.loop.training_data import Line
from lorag.server.auth import Principal, require_fine_tune
from lorag.server.recorder import CompletionRecorder, viewer_of
from lorag.serving.pipeline import Pipeline

router = APIRouter()
log = get_logger("lorag.loop")


def parse_request(body: Any) -> DataRequest:
    """The body as a DataRequest; the first problem is a 400 naming its field."""
    try:
        return DataRequest.model_validate(body)
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or None
        raise LoragError(f"{where + ': ' if where else ''}{problem['msg']}", param=where) from None


@router.post("/v1/training_data")
async def training_data(request: Request, principal: Principal = Depends(require_fine_tune)) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise LoragError("The request body must be a JSON object.") from None
    ask = parse_request(body)
    state = request.app.state
    built = await build_from_traffic(ask, state.pipeline, state.recorder, state.feedback, principal)
    return await asyncio.to_thread(store_files, ask, built, state.files, state.feedback, principal)


async def build_from_traffic(ask: DataRequest, pipeline: Pipeline, recorder: CompletionRecorder,
                             feedback: FeedbackStore, principal: Principal) -> Built:
    """Select the caller's stored completions and their feedback, then build the lines (lorag.improve.data)."""
    from lorag.evaluation.graders import domain_graders

    if ask.domain is not None and ask.domain not in pipeline.settings.domains:
        raise LoragError(f"No domain named {ask.domain!r}.", param="domain")
    viewer = viewer_of(principal)

    def select() -> tuple[list[Any], list[Any], list[Any]]:
        chosen = [] if ask.prompts is not None else recorder.store.select(
            viewer, model=ask.model, domain=ask.domain, metadata=ask.metadata, since=ask.since, until=ask.until)
        ids = [c.id for c in chosen]
        return chosen, feedback.ratings(ids), feedback.preferences(ids)

    completions, ratings, preferences = await recorder.run(select)

    def answerer(base_url: str | None) -> Answerer:
        if base_url is None:
            return PipelineAnswerer(pipeline, principal)
        api_key_env = ask.teacher.api_key_env if ask.teacher else None
        return EndpointAnswerer(base_url, api_key_env)

    sources = Sources(completions, ratings, preferences, answerer,
                      lambda domain: domain_graders(pipeline.settings, domain),
                      lambda scope, record: guarded_record(pipeline, scope, record))

    def progress(done: int, total: int) -> None:
        log.info("loop.data_progress", kind=ask.kind, done=done, total=total)

    return await build(ask, sources, progress)


def store_files(ask: DataRequest, built: Built, files: FileStore, feedback: FeedbackStore,
                principal: Principal) -> dict[str, Any]:
    """The lines as one JSONL file (and the held-out ones as another), each remembered per completion."""
    if not built.lines:
        raise LoragError(f"No {ask.kind} lines came out of {built.considered} stored completion(s) "
                         f"(left out: {built.skipped or 'none passed the selection'}); widen the filters or "
                         "add feedback first.", code="no_training_data")
    stem = ask.filename or f"{ask.kind}-{ask.domain or ask.model or 'all'}-{int(time.time())}"
    made = {"train": _write(files, feedback, built.lines, f"{stem}.jsonl", principal)}
    if built.holdout:
        made["holdout"] = _write(files, feedback, built.holdout, f"{stem}.holdout.jsonl", principal)
    return {"object": "training_data", "kind": ask.kind, "file": made["train"], "holdout_file": made.get("holdout"),
            "lines": len(built.lines), "holdout_lines": len(built.holdout), "considered": built.considered,
            "skipped": built.skipped}


def _write(files: FileStore, feedback: FeedbackStore, lines: list[Line], name: str,
           principal: Principal) -> dict[str, Any]:
    data = "".join(json.dumps(line.to_json(), ensure_ascii=False) + "\n" for line in lines).encode()
    made = files.add_bytes(data, filename=name, purpose="fine-tune", owner=principal.key_id)
    record_derived(feedback.db, made["id"], [cid for line in lines for cid in line.completions])
    return made
