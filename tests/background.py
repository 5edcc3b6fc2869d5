"""A blocking call (an HTTP request, say) in a thread, for tests that act while it is under way."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Background:
    """A blocking call in a thread; `result()` is its value or raises its error."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.value = call()
        except BaseException as err:  # noqa: BLE001 - re-raised by result()
            self.error = err

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float = 300) -> Any:
        self.thread.join(timeout)
        assert self.done, "the request never finished"
        if self.error is not None:
            raise self.error
        return self.value
