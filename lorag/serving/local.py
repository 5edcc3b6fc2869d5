"""The request pipeline in this process, on an event loop of its own: `lorag chat` and `lorag eval`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

from lorag.config import Settings


class LocalPipeline:
    """The engine and the pipeline in this process (no server needed)."""

    def __init__(self, settings: Settings) -> None:
        from lorag.logging import LOG_LEVEL_ENV, configure_logging
        from lorag.serving.build import build_engine, build_pipeline

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the terminal is for the answer
        configure_logging(level=os.environ.get(LOG_LEVEL_ENV, "warning"))
        self.loop = asyncio.new_event_loop()
        engine = build_engine(settings)
        self.loop.run_until_complete(engine.start())
        self.pipeline = build_pipeline(settings, engine)
        self.engine = engine

    def default_model(self) -> str:
        return self.pipeline.base_model

    def stream(self, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> Iterator[str]:
        from lorag.serving.jobs import new_request_id
        from lorag.serving.protocol import ChatCompletionRequest

        request = ChatCompletionRequest.model_validate({"model": model, "messages": messages, "stream": True, **params})
        job = self.loop.run_until_complete(self.pipeline.prepare_chat(request, new_request_id("chat")))
        deltas: AsyncIterator[Any] = self.pipeline.generate(job)
        while True:
            try:
                delta = self.loop.run_until_complete(deltas.__anext__())
            except StopAsyncIteration:
                return
            yield delta.text

    def close(self) -> None:
        self.pipeline.knowledge.close()
        self.loop.run_until_complete(self._shutdown())
        self.loop.close()

    async def _shutdown(self) -> None:
        """The engine, then whatever tasks are left, inside this pipeline's own loop."""
        await self.engine.shutdown()
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
