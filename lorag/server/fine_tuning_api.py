"""OpenAI's fine-tuning routes: /v1/fine_tuning/jobs and its events, checkpoints, cancel, pause, resume.

Every route needs a key with the `fine_tune` scope (or an admin key); a key sees and controls
only the jobs it made. The work is lorag.finetune.service's; this is HTTP only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from lorag.errors import LoragError
from lorag.finetune.service import FineTuningService
from lorag.server.auth import Principal, require_fine_tune
from lorag.server.pagination import check_limit, cursor_page, metadata_filter

router = APIRouter(prefix="/v1/fine_tuning/jobs")
MAX_PAGE = 100


async def get_service(request: Request) -> FineTuningService:
    service: FineTuningService = request.app.state.fine_tuning
    return service


@router.post("")
async def create_job(request: Request, service: FineTuningService = Depends(get_service),
                     principal: Principal = Depends(require_fine_tune)) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise LoragError("The request body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise LoragError("The request body must be a JSON object.")
    return await service.create(body, principal)


@router.get("")
async def list_jobs(request: Request, after: str | None = None, limit: int = 20,
                    service: FineTuningService = Depends(get_service),
                    principal: Principal = Depends(require_fine_tune)) -> dict[str, Any]:
    """Newest first; `metadata[key]=value` (any number of them) keeps only jobs with those values."""
    metadata = metadata_filter(request.query_params.items())
    jobs = await asyncio.to_thread(service.list_jobs, principal, metadata)  # reads every job's record
    return cursor_page(jobs, after=after, limit=check_limit(limit, MAX_PAGE))


@router.get("/{job_id}")
async def retrieve_job(job_id: str, service: FineTuningService = Depends(get_service),
                       principal: Principal = Depends(require_fine_tune)) -> dict[str, Any]:
    return service.get(job_id, principal)


@router.get("/{job_id}/events")
async def list_events(job_id: str, after: str | None = None, limit: int = 20,
                      service: FineTuningService = Depends(get_service),
                      principal: Principal = Depends(require_fine_tune)) -> dict[str, Any]:
    events = await asyncio.to_thread(service.events, job_id, principal)  # file reads: off the event loop
    return cursor_page(events, after=after, limit=check_limit(limit, MAX_PAGE))


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, after: str | None = None, limit: int = 10,
                           service: FineTuningService = Depends(get_service),
                           principal: Principal = Depends(require_fine_tune)) -> dict[str, Any]:
    checkpoints = await asyncio.to_thread(service.checkpoints, job_id, principal)
    return cursor_page(checkpoints, after=after, limit=check_limit(limit, MAX_PAGE))


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, service: FineTuningService = Depends(get_service),
                     principal: Principal = Depends(require_fine_tune)) -> dict[str, Any]:
    return await service.cancel(job_id, principal)


@router.post("/{job_id}/pause")
async def pause_job(job_id: str, service: FineTuningService = Depends(get_service),
                    principal: Principal = Depends(require_fine_tune)) -> dict[str, Any]:
    return await service.pause(job_id, principal)


@router.post("/{job_id}/resume")
async def resume_job(job_id: str, service: FineTuningService = Depends(get_service),
                     principal: Principal = Depends(require_fine_tune)) -> dict[str, Any]:
    return await service.resume(job_id, principal)
