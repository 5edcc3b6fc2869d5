"""Several async streams as one, all running at once: the prompts of one text completion.

vLLM's own server runs a request's prompts concurrently; one after another, the last prompt
would wait for all the others. Closing the merged stream (the client went away) closes every
source, which aborts their engine requests; the first source to fail stops the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()


async def merged(sources: list[AsyncGenerator[T, None]]) -> AsyncGenerator[T, None]:
    """Items of every source as they come (each source's own order kept)."""
    if len(sources) == 1:
        async with aclosing(sources[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue(maxsize=len(sources))

    async def pump(source: AsyncGenerator[T, None]) -> None:
        try:
            async with aclosing(source) as items:
                async for item in items:
                    await queue.put((item, None))
        except Exception as err:  # handed to the consumer, who stops the others
            await queue.put((_END, err))
            return
        await queue.put((_END, None))

    tasks = [asyncio.create_task(pump(source)) for source in sources]
    try:
        running = len(tasks)
        while running:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is _END:
                running -= 1
                continue
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
