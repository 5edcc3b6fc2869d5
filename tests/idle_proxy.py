"""A TCP proxy in front of a real server that closes idle connections the way a keep-alive timeout does.

A server closes a keep-alive connection once it has been idle for its timeout; a client that
writes its next request at that very moment finds the connection gone before any byte of a
response. That race is rare and timing-bound in the wild. Here it is made certain: a client
connection idle for `idle_s` is cut (reset) the moment the client writes on it again, before a
byte reaches the server. `down` makes the server unreachable (new and current connections cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

START_TIMEOUT_S = 60


class IdleClosingProxy:
    def __init__(self, target_port: int, idle_s: float) -> None:
        self.target_port = target_port
        self.idle_s = idle_s
        self.down = False
        self.cut_idle = 0  # connections cut because they were written to after idling
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-proxy", daemon=True)

    def start(self) -> IdleClosingProxy:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("the proxy did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT_S)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        loop = asyncio.get_running_loop()
        last = [loop.time()]

        async def to_server() -> None:
            while data := await reader.read(65536):
                if self.down or loop.time() - last[0] > self.idle_s:
                    self.cut_idle += not self.down
                    return
                last[0] = loop.time()
                up_writer.write(data)
                await up_writer.drain()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                last[0] = loop.time()
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(to_server()), asyncio.ensure_future(to_client())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        writer.transport.abort()  # a reset, as a server's closed socket answers a late write
        up_writer.transport.abort()


@contextlib.contextmanager
def idle_proxy(target_port: int, idle_s: float) -> Iterator[IdleClosingProxy]:
    proxy = IdleClosingProxy(target_port, idle_s).start()
    try:
        yield proxy
    finally:
        proxy.stop()
