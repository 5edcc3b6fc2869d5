"""Stage 2: the domain's knowledge bases searched with the question, and the same search
handed to plugins and tools (PluginContext.search_knowledge) for the model to use itself."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from lorag import lanes
from lorag.errors import LoragError, NotFoundError
from lorag.logging import get_logger, stage
from lorag.serving.jobs import Target, ms_since

if TYPE_CHECKING:
    from lorag.knowledge.link import KnowledgeLink
    from lorag.knowledge.retrieval import Hit
    from lorag.plugins.host import RequestHooks
    from lorag.plugins.types import KnowledgeSearch
    from lorag.serving.domains import Domain, DomainCatalog
    from lorag.serving.principal import Principal
    from lorag.serving.protocol import RequestOptions

log = get_logger("lorag.request")
# The most passages one search by a plugin or tool returns.
MAX_SEARCH_TOP_K = 20


class KnowledgeUnavailable(LoragError):
    status_code = 503
    error_type = "server_error"
    code = "knowledge_unavailable"


class ContextRetriever:
    def __init__(self, knowledge: KnowledgeLink, domains: DomainCatalog) -> None:
        self.knowledge = knowledge
        self.domains = domains

    async def retrieve(self, target: Target, options: RequestOptions, question: str, hooks: RequestHooks,
                       timings: dict[str, float], extras: dict[str, Any],
                       principal: Principal | None) -> list[Hit]:
        """The domain's (or the request's) knowledge bases, searched with the last user message.

        A failure follows the domain's `on_error`: "fail" is a 503, otherwise the request goes
        on without context and says so in `lorag.retrieval`.
        """
        domain = target.domain
        if domain is None or options.no_retrieval or not question.strip():
            if options.knowledge_bases and domain is None:
                raise LoragError("lorag.knowledge_bases needs a domain model (retrieval belongs to domains).",
                                 param="lorag.knowledge_bases")
            return []
        cfg = domain.settings.knowledge
        kbs = options.knowledge_bases if options.knowledge_bases is not None else cfg.bases
        if not kbs:
            return []
        self.domains.check_kbs(principal, kbs)
        mark = time.perf_counter()
        try:
            hits = await lanes.KNOWLEDGE.run(
                self.query, kbs, question, options.top_k or cfg.top_k, options.mode or cfg.mode,
                options.filters if options.filters is not None else cfg.filters, cfg.score_threshold,
                timeout=cfg.timeout_s)
        except Exception as err:
            if isinstance(err, LoragError) and err.status_code < 500 and not isinstance(err, NotFoundError):
                raise  # the request's own fault (a bad filter): the client should hear it
            message = "timed out" if isinstance(err, TimeoutError) else str(err) or type(err).__name__
            log.warning("retrieve_failed", domain=domain.name, kbs=kbs, error=message)
            if cfg.on_error == "fail":
                raise KnowledgeUnavailable(
                    f"Retrieval for the domain '{domain.name}' failed: {message}. Try again later.") from None
            extras["retrieval"] = {"skipped": True, "error": message}
            return []
        finally:
            timings["retrieve_ms"] = ms_since(mark)
        with stage(log, "context_hooks", "debug", chunks=len(hits)):
            return list(await hooks.acontext_retrieved(question, hits))

    def query(self, kbs: list[str], question: str, top_k: int | None, mode: str | None,
              filters: dict[str, Any] | None, threshold: float | None) -> list[Hit]:
        return self.knowledge.get().query(kbs, question, top_k=top_k, mode=mode, filters=filters,
                                          score_threshold=threshold)

    def searcher(self, domain: Domain | None, principal: Principal | None) -> KnowledgeSearch | None:
        """The domain's knowledge search for plugins and tools: its bases, settings and the caller's access."""
        if domain is None:
            return None
        kbs = domain.knowledge_bases
        cfg = domain.settings.knowledge

        def search_knowledge(query: str, top_k: int | None = None) -> list[dict[str, Any]]:
            if not kbs:
                return []
            self.domains.check_kbs(principal, kbs)
            limit = min(max(top_k or cfg.top_k or 3, 1), MAX_SEARCH_TOP_K)
            hits = self.query(kbs, query, limit, cfg.mode, cfg.filters, cfg.score_threshold)
            return [{"source": h.source, "location": h.location, "text": h.text, "score": h.score, "kb": h.kb}
                    for h in hits]

        return search_knowledge
