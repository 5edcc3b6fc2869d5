"""`model: "auto"`: pick the domain whose profile is closest to the question.

A domain's profile is its description, its example questions and its knowledge.
The question is embedded once; a domain scores the mean of its best single match
(cosine) and its match with the profile's centroid (the best match alone is swayed
by one lucky example, the centroid alone by a broad description), or its best
knowledge hit if that is higher. Below the threshold the question goes to the fallback.
Only domains the caller's key may use take part. The pipeline routes in the knowledge lane
(lorag.lanes), within `routing.timeout_s`, on the question as `plugins.before_routing` lets it
through (personal data redacted by the pii plugin by default).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lorag.errors import LoragError, PermissionDenied
from lorag.logging import get_logger
from lorag.serving.domains import unit_rows

if TYPE_CHECKING:
    from lorag.config import Settings
    from lorag.knowledge.link import KnowledgeLink
    from lorag.serving.domains import Domain, DomainCatalog
    from lorag.serving.principal import Principal

log = get_logger("lorag.routing")


class RoutingUnavailable(LoragError):
    status_code = 503
    error_type = "server_error"
    code = "routing_unavailable"


@dataclass
class RouteDecision:
    domain: str
    score: float
    confident: bool
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "score": round(self.score, 4), "confident": self.confident,
                "scores": {name: round(score, 4) for name, score in self.scores.items()}}


class Router:
    def __init__(self, settings: Settings, catalog: DomainCatalog, knowledge: KnowledgeLink) -> None:
        self.settings = settings
        self.catalog = catalog
        self.knowledge = knowledge
        self._profiles: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def route(self, question: str, principal: Principal | None = None) -> RouteDecision:
        candidates = self.catalog.usable(principal)
        if not candidates:
            raise PermissionDenied("This API key may not use any domain, so 'auto' has nothing to route to.",
                                   param="model")
        embedder = self.catalog.embedder()
        query = embedder.encode_query(question)
        knowledge = self._knowledge_scores(question, candidates)
        scores: dict[str, float] = {}
        for domain in candidates:
            scores[domain.name] = max(self._profile_score(domain, query), knowledge.get(domain.name, -1.0))
        best_name = max(scores, key=lambda name: scores[name])
        threshold = self.settings.routing.threshold
        fallback = self.settings.routing.fallback
        if fallback is not None and not self.catalog.may_use(principal, fallback):
            fallback = None  # a key that may not use the fallback keeps its own best domain
        confident = scores[best_name] >= threshold
        chosen = best_name if confident or fallback is None else fallback
        decision = RouteDecision(chosen, scores.get(chosen, scores[best_name]), confident, scores)
        log.info("route", domain=chosen, score=round(decision.score, 4), confident=confident,
                 fallback=not confident and fallback is not None)
        return decision

    def without_route(self, principal: Principal | None, why: str) -> RouteDecision:
        """When routing could not finish (timed out): the fallback domain, or a 503 without one."""
        fallback = self.settings.routing.fallback
        if fallback is None or not self.catalog.may_use(principal, fallback):
            raise RoutingUnavailable(f"'auto' could not route this question: {why}. Name a domain, or retry.")
        log.warning("route_fallback", domain=fallback, reason=why)
        return RouteDecision(fallback, 0.0, False)

    def _profile_score(self, domain: Domain, query: np.ndarray) -> float:
        profile, centroid = self._profile(domain)
        if not len(profile):
            return -1.0
        return 0.5 * float(np.max(profile @ query)) + 0.5 * float(centroid @ query)

    def warm(self) -> None:
        """Embed every domain's profile now (start-up), so the first 'auto' request does not;
        this also embeds the few-shot example vectors 'similar' selection uses."""
        for domain in self.catalog:
            self._profile(domain)

    def _profile(self, domain: Domain) -> tuple[np.ndarray, np.ndarray]:
        """Unit vectors of the description and example questions, and their unit centroid (once per domain)."""
        with self._lock:
            cached = self._profiles.get(domain.name)
            if cached is None:
                parts = []
                if domain.settings.description.strip():
                    parts.append(unit_rows(self.catalog.embedder().encode_documents([domain.settings.description])))
                if domain.examples:
                    parts.append(self.catalog.example_vectors(domain))
                profile = np.vstack(parts) if parts else np.zeros((0, 1), dtype=np.float32)
                centroid = unit_rows(profile.mean(axis=0, keepdims=True))[0] if parts else np.zeros(1)
                cached = self._profiles[domain.name] = (profile, centroid)
            return cached

    def _knowledge_scores(self, question: str, domains: list[Domain]) -> dict[str, float]:
        """Each domain's best vector hit (cosine) in its own knowledge bases; one search over all."""
        depth = self.settings.routing.knowledge_hits
        owners: dict[str, list[str]] = {}
        for domain in domains:
            for kb in domain.knowledge_bases:
                owners.setdefault(kb, []).append(domain.name)
        if not owners or depth == 0:
            return {}
        try:
            hits = self.knowledge.get().query(list(owners), question, top_k=depth * len(owners), mode="vector")
        except Exception as err:  # routing still works from descriptions and examples
            log.warning("route_knowledge_failed", error=str(err))
            return {}
        scores: dict[str, float] = {}
        for hit in hits:
            for name in owners.get(hit.kb, []):
                scores[name] = max(scores.get(name, -1.0), hit.score)
        return scores
