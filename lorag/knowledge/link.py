"""The one knowledge service of a running pipeline, opened on first use.

The composition root (lorag.serving.build) makes one link and hands it to every part
that queries or administers knowledge (the pipeline, the router, the warm-up, the
HTTP routes, the metrics), so they share one store and its lock. Nothing is opened,
and nothing heavy imported, until a part asks: a server without domains never loads
Chroma. A closed service is opened again on the next use.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorag.config import Settings
    from lorag.knowledge.service import KnowledgeService


class KnowledgeLink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._service: KnowledgeService | None = None
        self._lock = threading.Lock()

    def get(self) -> KnowledgeService:
        """The service, opened now if it is not open (an open that fails is tried again next time)."""
        with self._lock:
            if self._service is None or self._service.closed:
                from lorag.knowledge.service import KnowledgeService

                self._service = KnowledgeService.from_settings(self.settings)
            return self._service

    def opened(self) -> KnowledgeService | None:
        """The service if something already opened it; never opens the store (metrics scrapes)."""
        service = self._service
        return service if service is not None and not service.closed else None

    def close(self) -> None:
        """Release the store and its lock (shutdown); a later get() opens it again."""
        with self._lock:
            service, self._service = self._service, None
        if service is not None:
            service.close()
