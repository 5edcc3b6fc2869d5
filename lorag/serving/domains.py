"""Domains at run time: who may use which, and which few-shot examples a question gets.

A domain is a profile from lorag.toml (lorag.serving.settings). This module
answers the questions the request path and the knowledge API ask about profiles;
it holds no request state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lorag.errors import NotFoundError, PermissionDenied
from lorag.serving.settings import DomainSettings, Example

if TYPE_CHECKING:
    from lorag.config import Settings
    from lorag.serving.principal import Principal


@dataclass
class Domain:
    name: str
    settings: DomainSettings
    examples: list[Example]
    _vectors: np.ndarray | None = field(default=None, repr=False)

    @property
    def knowledge_bases(self) -> list[str]:
        return list(self.settings.knowledge.bases)

    def summary(self) -> dict[str, Any]:
        """What /v1/models and `lorag domains list` show."""
        return {
            "description": self.settings.description,
            "adapter": self.settings.adapter,
            "knowledge_bases": self.knowledge_bases,
            "examples": len(self.examples),
            "tools": list(self.settings.tools.enabled),
        }


class DomainCatalog:
    """Every configured domain, with access checks and example selection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.domains = {
            name: Domain(name, profile, profile.examples.all_items()) for name, profile in settings.domains.items()
        }
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self.domains

    def __iter__(self) -> Any:
        return iter(self.domains.values())

    def get(self, name: str) -> Domain:
        domain = self.domains.get(name)
        if domain is None:
            raise NotFoundError(f"No domain named '{name}'. `lorag domains list` shows them.", param="model")
        return domain

    # -- access -------------------------------------------------------------

    def may_use(self, principal: Principal | None, name: str) -> bool:
        """The key's scope includes the domain, and the domain admits the key (by name)."""
        if principal is None or principal.admin:
            return True
        allowed_keys = self.domains[name].settings.api_keys
        return principal.may_use(name) and (allowed_keys is None or principal.name in allowed_keys)

    def check_use(self, principal: Principal | None, name: str) -> None:
        if not self.may_use(principal, name):
            raise PermissionDenied(f"This API key may not use the domain '{name}'.", param="model")

    def usable(self, principal: Principal | None) -> list[Domain]:
        return [d for d in self.domains.values() if self.may_use(principal, d.name)]

    def kb_visible(self, principal: Principal | None, kb: str) -> bool:
        """A knowledge base a domain owns is visible only to keys that may use that domain.

        Bases no domain names are visible to unscoped keys only.
        """
        if principal is None or principal.admin:
            return True
        owners = [d.name for d in self.domains.values() if kb in d.settings.knowledge.bases]
        if not owners:
            return principal.domains is None
        return any(self.may_use(principal, owner) for owner in owners)

    def check_kbs(self, principal: Principal | None, kbs: list[str]) -> None:
        hidden = [kb for kb in kbs if not self.kb_visible(principal, kb)]
        if hidden:
            raise PermissionDenied(f"This API key may not read the knowledge base '{hidden[0]}'.", param="kb")

    # -- few-shot examples --------------------------------------------------

    def select_examples(self, domain: Domain, question: str, k: int | None = None) -> list[Example]:
        """The first k examples ("fixed"), or the k most similar to the question ("similar")."""
        k = domain.settings.examples.k if k is None else k
        if k <= 0 or not domain.examples:
            return []
        if domain.settings.examples.select == "fixed" or len(domain.examples) <= k or not question.strip():
            return domain.examples[:k]
        embedder = self.embedder()
        vectors = self.example_vectors(domain)
        scores = vectors @ embedder.encode_query(question)
        best = np.argsort(-scores, kind="stable")[:k]
        return [domain.examples[int(i)] for i in best]

    def embedder(self) -> Any:
        from lorag.knowledge.embeddings import get_embedder

        return get_embedder(self.settings.knowledge.embedding)

    def example_vectors(self, domain: Domain) -> np.ndarray:
        """Unit vectors of the example questions, embedded once (example selection and routing share them)."""
        with self._lock:
            if domain._vectors is None:
                texts = [example.question for example in domain.examples]
                domain._vectors = unit_rows(self.embedder().encode_documents(texts))
            return domain._vectors


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (zero rows stay zero), so dot products are cosines."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1, norms)
