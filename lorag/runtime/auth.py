"""API keys: who is calling, and may they use admin endpoints.

With no keys configured the server is open (and binds to loopback only, see
lorag.runtime.cli). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from lorag.config import ApiKey
from lorag.errors import AuthenticationError, PermissionDenied


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    name: str
    admin: bool


ANONYMOUS_ADMIN = Principal(name="anonymous", admin=True)


def identify(keys: list[ApiKey], authorization: str | None) -> Principal:
    """Map an Authorization header to a principal; no keys configured means open access."""
    if not keys:
        return ANONYMOUS_ADMIN
    token = ""
    if authorization and authorization.lower().startswith("bearer "):
        token = authorization[7:].strip()
    if not token:
        raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.")
    for entry in keys:
        if hmac.compare_digest(entry.key.encode(), token.encode()):
            return Principal(name=entry.name or "key", admin=entry.admin)
    raise AuthenticationError("Invalid API key.")


def require_key(request: Request) -> Principal:
    """FastAPI dependency: any valid key (or none configured)."""
    keys: list[ApiKey] = request.app.state.settings.server.api_keys
    return identify(keys, request.headers.get("authorization"))


def require_admin(request: Request) -> Principal:
    """FastAPI dependency: an admin key (or none configured)."""
    principal = require_key(request)
    if not principal.admin:
        raise PermissionDenied("This endpoint needs an admin API key.")
    return principal
