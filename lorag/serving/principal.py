"""Who is calling: what one request's API key may reach. The HTTP layer (lorag.server.auth) makes one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """The caller of one request, with what its key may reach."""

    name: str
    admin: bool
    # Domains this key may use; None means every domain.
    domains: frozenset[str] | None = None
    # May query knowledge bases directly (/v1/knowledge), not only through a domain.
    knowledge: bool = True
    # May change retrieval or the adapter per request (the body's `lorag` field).
    overrides: bool = True
    # May upload files and run fine-tuning jobs (they take the machine's time): off unless granted.
    fine_tune: bool = False
    # Who the key is, for limits and metrics: from its hash, so two unnamed keys are two callers.
    key_id: str = ""

    @property
    def limit_key(self) -> str:
        return self.key_id or self.name

    def may_use(self, domain: str) -> bool:
        return self.admin or self.domains is None or domain in self.domains


ANONYMOUS_ADMIN = Principal(name="anonymous", admin=True, key_id="anonymous")
