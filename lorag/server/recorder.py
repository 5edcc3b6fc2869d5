"""`store: true` on the request path: decide whether a chat completion is kept, and keep it off the loop.

The record is made from the response exactly as it was sent (streamed or not, the same
ChatCompletion) and from the job: the conversation after the input hooks, the rendered
prompt with its context and sources. Writes run in one background thread, in the order
the answers finished: a record waits up to FLUSH_AFTER_S for others, and all of them go in
one transaction (one commit and a few GIL hand-overs per batch, not per answer: each
hand-over stalls the event loop; benchmarks/stored_completions.py). A read through the API
first writes what is queued and waits for it, so a client that lists right after its answer
sees it (on the replica that answered; with `[state] backend = "postgres"` the others see it
once its batch commits); shutting down writes it too. A failed write is logged, never turned
into an error for a request that has already been answered.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lorag.config import Settings
from lorag.errors import LoragError
from lorag.logging import get_logger
from lorag.loop.completions import DAY_S, CompletionStore, StoredCompletion
from lorag.serving.jobs import Job
from lorag.serving.principal import Principal
from lorag.serving.protocol import ChatCompletionRequest

log = get_logger("lorag.loop")
Keep = Callable[[dict[str, Any]], None]
SWEEP_EVERY = 1000  # writes between two deletions of expired records
FLUSH_AFTER_S = 0.05  # how long a record waits for others to share its transaction


def owner_of(principal: Principal) -> str:
    """Who a stored record belongs to: the key (its id), as with files and fine-tuning jobs."""
    return principal.limit_key


def viewer_of(principal: Principal) -> str | None:
    """Whose records a caller may see: its own; an admin's view is everyone's (None)."""
    return None if principal.admin else owner_of(principal)


class CompletionRecorder:
    """Stores answered chat completions in the background; reads wait for the writes before them."""

    def __init__(self, settings: Settings, store: CompletionStore) -> None:
        self.settings = settings
        self.store = store
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorag-store")
        self._pending: set[asyncio.Future[None]] = set()
        self._batch: list[StoredCompletion] = []
        self._batch_lock = threading.Lock()
        self._flush_queued = False  # a flush is planned (timer or writer) that has not taken the batch yet
        self._timer: asyncio.TimerHandle | None = None
        self._writes = 0

    def plan(self, job: Job, body: ChatCompletionRequest, principal: Principal) -> Keep | None:
        """What keeps this job's answer, or None when it is not stored; a 400 for metadata without store."""
        domain = job.target.domain.settings if job.target.domain else None
        store = body.store if body.store is not None else bool(domain and domain.store)
        if body.metadata and not store:
            raise LoragError("`metadata` is only allowed on a stored completion: set `store: true`.",
                             param="metadata")
        if not store:
            return None
        if not self.settings.stored_completions.enabled:
            raise LoragError("Stored completions are off on this server ([stored_completions] enabled = false).",
                             param="store")
        days = (domain.store_retention_days if domain else None) or self.settings.stored_completions.retention_days
        owner = owner_of(principal)

        def keep(response: dict[str, Any]) -> None:
            self.record(stored_record(job, body, response, owner, days))

        return keep

    def record(self, record: StoredCompletion) -> None:
        """Queue one record (on the event loop's thread): it joins the next flush's batch."""
        with self._batch_lock:
            self._batch.append(record)
            if self._flush_queued:
                return
            self._flush_queued = True
        self._timer = asyncio.get_running_loop().call_later(FLUSH_AFTER_S, self._submit)

    def _submit(self) -> None:
        """Hand the planned flush to the writer thread now (on the event loop's thread)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        future = asyncio.get_running_loop().run_in_executor(self._writer, self._flush)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def settled(self) -> None:
        """Write what is queued now and wait for every write so far (read-your-writes for the API)."""
        if self._timer is not None:
            self._submit()
        if self._pending:
            await asyncio.wait(list(self._pending))

    async def run(self, work: Callable[..., Any], *args: Any) -> Any:
        """A read or an edit of the store, after the queued writes, on the writer's thread."""
        await self.settled()
        return await asyncio.get_running_loop().run_in_executor(self._writer, work, *args)

    def close(self) -> None:
        """Finish the writes, the queued batch included (its timer dies with the event loop)."""
        self._writer.shutdown(wait=True)
        if self._batch:
            self._flush()

    def _flush(self) -> None:
        """Write every record queued so far, in one transaction (on the writer's thread)."""
        with self._batch_lock:
            batch, self._batch = self._batch, []
            self._flush_queued = False
        try:
            for duplicate in self.store.add(*batch):
                log.warning("completion_store_duplicate", id=duplicate,
                            reason="a completion with this id (the request's x-request-id) is already stored")
            if self._writes // SWEEP_EVERY != (self._writes + len(batch)) // SWEEP_EVERY or not self._writes:
                self.store.sweep()
            self._writes += len(batch)
            log.debug("completions_stored", count=len(batch), ids=[record.id for record in batch])
        except Exception as err:  # the answers are already sent: log it, never fail them
            log.error("completion_store_failed", ids=[record.id for record in batch], error=str(err))


def stored_record(job: Job, body: ChatCompletionRequest, response: dict[str, Any], owner: str,
                  retention_days: int) -> StoredCompletion:
    """The record of one answered chat completion (what the model saw, and what was sent)."""
    sent = {key: value for key, value in response.items() if key != "metadata"}
    return StoredCompletion(
        id=job.request_id, owner=owner, created=job.created, expires_at=job.created + retention_days * DAY_S,
        model=body.model, domain=job.target.domain.name if job.target.domain else None,
        adapter=job.target.adapter_ref, metadata=dict(body.metadata or {}),
        messages=list(job.conversation or []), response=sent,
        context={"prompt_messages": job.messages or []})  # the sources are in response["lorag"]["citations"]
