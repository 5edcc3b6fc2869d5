"""The remote engine: generation on a fleet of vLLM OpenAI servers, with lorag as the control plane.

It is a lorag engine like lorag.engine.Engine (the pipeline cannot tell them apart): it
renders nothing itself (the pipeline hands it prompt tokens), it streams each request from
one server's /v1/completions under the adapter's name, and it keeps every server holding
every registered adapter (lorag.fleet.control). A request that fails before any output
reaches the pipeline is tried on another server; one that breaks after ends with an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from lorag.errors import EngineUnavailable, LoragError
from lorag.fleet.client import ServerError
from lorag.fleet.control import FleetControl
from lorag.fleet.translate import RemoteCompletion, RemoteOutput, completion_body, hold
from lorag.logging import get_logger

if TYPE_CHECKING:
    from lorag.adapters.registry import AdapterVersion
    from lorag.config import Settings
    from lorag.fleet.routing import ServerState

log = get_logger("lorag.fleet")
SERVER_POLL_S = 0.1  # how often a request waiting for a server looks again


class BadRemoteRequest(LoragError):
    """A server refused the request itself (HTTP 4xx): the client's to fix, not worth a retry."""


class RemoteEngine(FleetControl):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._tokenizer: Any = None

    # -- what the pipeline reads ----------------------------------------------------

    async def start(self) -> None:
        from transformers import AutoTokenizer

        from lorag.models.check import check_model

        check_model(self.settings.model)
        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.settings.model.path)
        await self.open()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        """The smallest window among the servers (or model.max_model_len when none has answered yet)."""
        known = [s.max_model_len for s in self.states.values() if s.max_model_len]
        configured = self.settings.model.max_model_len
        if known:
            return min([*known, configured] if configured else known)
        if configured:
            return configured
        raise EngineUnavailable("No vLLM server has answered yet; retry later.")

    # -- generation -------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], params: Any, request_id: str,
                       adapter: AdapterVersion | None) -> AsyncGenerator[RemoteOutput, None]:
        """Stream one request from one server; before any output, a failed server is replaced."""
        if adapter is not None and self.needs_loading(adapter):
            await self.load_adapter(adapter)  # registered elsewhere or before this process started
        with self.leases.hold(adapter):  # the request's own lease, for callers that took none
            name = adapter.ref if adapter is not None else self.null_name
            whole = getattr(getattr(params, "output_kind", None), "name", "") == "FINAL_ONLY"
            tried: set[str] = set()
            for _ in range(self.fleet.retries + 1):
                state = await self._server_for(name, tried)
                tried.add(state.name)
                sent = False
                try:
                    async with self.lease(state, name):
                        body = completion_body(name or state.base_id or self.settings.model.served_name,
                                               prompt_token_ids, params, request_id, self.fleet.stream_interval)
                        if whole:  # nothing reaches the pipeline before the end: any failure may be retried
                            yield await self._collected(state, body)
                            return
                        # aclosing: when the client goes away, the upstream request is closed now (and
                        # the server aborts it), not whenever the garbage collector finalizes the stream.
                        # Output without text (a token that decodes to nothing yet) is held and sent
                        # with the next text: until text has gone out, a failure can still move on.
                        held: dict[int, RemoteCompletion] = {}
                        async with aclosing(self.clients[state.name].stream_completion(body)) as chunks:
                            async for chunk in chunks:
                                hold(held, chunk)
                                if any(part.text or part.finished() for part in held.values()):
                                    sent = True
                                    yield RemoteOutput(list(held.values()))
                                    held = {}
                        if held:  # a stream that ended without a finish reason: nothing is dropped
                            yield RemoteOutput(list(held.values()))
                        self.mark_succeeded(state)
                        return
                except ServerError as err:
                    if err.status == 404 and not sent:  # it lost the adapter (a restart between health checks)
                        self.mark_lost(state, name, str(err))
                        continue
                    if not err.server_fault:
                        raise BadRemoteRequest(f"The model server refused the request: {err}") from None
                    self.mark_failed(state, err)
                    if sent:
                        raise EngineUnavailable(f"The model server stopped mid-answer ({state.name}); "
                                                "the text so far is all there is. Retry the request.") from None
                    log.warning("remote_request_retried", server=state.name, error=str(err), request_id=request_id)
            raise EngineUnavailable(self._why_none(name, tried))

    async def _collected(self, state: ServerState, body: dict[str, Any]) -> RemoteOutput:
        """A whole answer (non-streamed requests), one completion per choice."""
        choices: dict[int, RemoteCompletion] = {}
        async with aclosing(self.clients[state.name].stream_completion(body)) as chunks:
            async for chunk in chunks:
                hold(choices, chunk)
        self.mark_succeeded(state)
        return RemoteOutput([choices[i] for i in sorted(choices)], finished=True)

    async def _server_for(self, name: str | None, tried: set[str]) -> ServerState:
        """The server for the next try. When none that holds the adapter is up now (all resting or
        restarting) but an untried one may come back, wait up to `fleet.wait_for_server_s` (the
        request's own deadline still applies) instead of failing at once."""
        waited_from: float | None = None
        loop = asyncio.get_running_loop()
        read_at = loop.time()
        while True:
            state = self.picker.pick(list(self.states.values()), name, exclude=tried)
            if state is not None:
                if waited_from is not None:
                    log.info("server_wait_over", server=state.name, waited_ms=round((loop.time() - waited_from) * 1000))
                return state
            if waited_from is None:
                waited_from = loop.time()
                log.warning("server_wait", adapter=name, tried=sorted(tried))
            if not set(self.states) - tried or loop.time() - waited_from >= self.fleet.wait_for_server_s:
                raise EngineUnavailable(self._why_none(name, tried))
            if not self.leading and loop.time() - read_at >= self.fleet.health_interval_s:
                read_at = loop.time()  # a follower sees the leader's repairs only by looking
                await self._reconcile_all()
            await asyncio.sleep(SERVER_POLL_S)

    def _why_none(self, name: str | None, tried: set[str]) -> str:
        what = f"the adapter '{name}'" if name and name != self.null_name else "the base model"
        refused = {s.name: s.refused[name] for s in self.states.values() if name in s.refused}
        detail = f" Refused by: {'; '.join(f'{k}: {v}' for k, v in refused.items())}." if refused else ""
        tried_text = f" Tried: {', '.join(sorted(tried))}." if tried else ""
        return f"No model server that holds {what} is available.{tried_text}{detail} Retry later."

    # -- what the health check and status read ---------------------------------------------

    async def check_health(self) -> None:
        if not any(s.up and s.ready for s in self.states.values()):
            down = "; ".join(f"{s.name}: {s.error or 'starting'}" for s in self.states.values())
            raise EngineUnavailable(f"No model server is up ({down}).")

