"""Stage 1: which domain, model and adapter version answer a request, checked against the caller's key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorag.adapters.registry import AdapterRegistry, AdapterVersion, split_ref
from lorag.errors import NotFoundError, PermissionDenied
from lorag.serving.domains import Domain, DomainCatalog
from lorag.serving.jobs import Target

if TYPE_CHECKING:
    from lorag.serving.principal import Principal
    from lorag.serving.routing import RouteDecision


class Resolver:
    def __init__(self, base_model: str, registry: AdapterRegistry, domains: DomainCatalog) -> None:
        self.base_model = base_model
        self.registry = registry
        self.domains = domains

    def check_auto(self) -> None:
        """'auto' needs domains to route to (before any routing work is done)."""
        if not self.domains.domains:
            raise NotFoundError("'auto' needs domains in lorag.toml; none are configured.", param="model")

    def resolve(self, model: str, principal: Principal | None = None, adapter_override: str | None = None,
                route: RouteDecision | None = None) -> Target:
        """What answers `model`.

        'auto' -> the routed domain (`route`, decided by the caller); '<domain>' -> the domain and
        its adapter ('<domain>@v2': that version of the domain's adapter); '<base model>' -> base;
        '<adapter>[@version]' -> it. Base and bare adapters are for keys not scoped to domains.
        """
        if model == "auto":
            self.check_auto()
            if route is None:
                raise AssertionError("'auto' is resolved after routing")
            model = route.domain
        name, version = split_ref(model)
        if name in self.domains:
            self.domains.check_use(principal, name)
            domain = self.domains.get(name)
            adapter = self._domain_adapter(domain, version, adapter_override, principal)
            return Target(model=model, adapter=adapter, domain=domain, route=route)
        if principal is not None and not principal.admin and principal.domains is not None:
            raise PermissionDenied(f"This API key may only use its domains, not the model '{model}'.",
                                   param="model")
        if model == self.base_model:
            return Target(model=model, adapter=None)
        return Target(model=model, adapter=self._adapter(model, "model", principal))

    def _domain_adapter(self, domain: Domain, version: str | None, override: str | None,
                        principal: Principal | None) -> AdapterVersion | None:
        configured = domain.settings.adapter
        if override is not None:
            if override == "none":
                return None
            if split_ref(override)[0] != (split_ref(configured)[0] if configured else None) and not (
                principal is None or principal.admin or principal.domains is None
            ):
                raise PermissionDenied("This API key may not swap the domain's adapter for another one.",
                                       param="lorag.adapter")
            return self._adapter(override, "lorag.adapter", principal)
        if configured is None:
            if version is not None:
                raise NotFoundError(f"The domain '{domain.name}' has no adapter, so no version '{version}'.",
                                    param="model")
            return None
        ref = f"{split_ref(configured)[0]}@{version}" if version else configured
        return self._adapter(ref, "model")

    def _adapter(self, ref: str, param: str, principal: Principal | None = None) -> AdapterVersion:
        """The version `ref` names, if the caller may name it (another key's fine-tuned model looks absent)."""
        try:
            entry = self.registry.resolve(ref)
            if not may_name(principal, entry):
                raise NotFoundError(ref)
            return entry
        except NotFoundError:
            raise NotFoundError(
                f"The model '{ref}' does not exist. GET /v1/models lists the served models.", param=param,
            ) from None


def may_name(principal: Principal | None, entry: AdapterVersion) -> bool:
    """Whether a key may ask for this adapter by name: its owner's (a fine-tuning job's key) and admins'."""
    return entry.owner is None or principal is None or principal.admin or principal.key_id == entry.owner
