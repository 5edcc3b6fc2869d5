"""API keys: who is calling, and what their key may reach.

Keys come from two places: `[[server.api_keys]]` in lorag.toml (fixed for the life
of the process) and the key store `<state_dir>/keys.json` (`lorag keys`), which is
re-read whenever the file changes, so a revocation takes effect on the next request
without a restart. Both are compared the same way: the sha256 of the presented key
against each known hash, in constant time. Secrets and hashes are never logged.

With no keys at all the server is open, and `lorag serve` binds it to loopback only
(lorag.server.cli); a server that was started with keys, or on another address,
sets `app.state.keys_required` and never falls back to open access.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass

from fastapi import Request
from pydantic import ValidationError

from lorag.config import ApiKey
from lorag.errors import AuthenticationError, PermissionDenied
from lorag.logging import get_logger
from lorag.server.key_stores import key_store
from lorag.server.keys import KeyStore, KeyStoreError
from lorag.server.keys_pg import PostgresKeyStore
from lorag.serving.principal import ANONYMOUS_ADMIN, Principal

log = get_logger("lorag.auth")
# Re-read keys.json at least this often even if its stat looks unchanged (belt and braces).
MAX_AGE_S = 10.0
RETRY_S = 1.0  # after the key store failed, how long requests get that error before it is asked again


@dataclass(frozen=True)
class KeyEntry:
    """One known key: the raw sha256 digest to compare against, and who it makes the caller."""

    digest: bytes
    principal: Principal
    revoked: bool = False


def principal_for(key: ApiKey) -> Principal:
    return Principal(
        name=key.name or "key",
        admin=key.admin,
        domains=frozenset(key.domains) if key.domains is not None else None,
        knowledge=key.knowledge,
        overrides=key.overrides,
        fine_tune=key.fine_tune,
        key_id=key_id(key.sha256),
    )


def key_id(sha256: str) -> str:
    """A key's identity for limits and metrics: a prefix of its hash (the hash of a random
    256-bit secret: it names the key without helping anyone guess it)."""
    return "key-" + sha256.removeprefix("sha256:")[:12]


def entry_for(key: ApiKey, revoked: bool = False) -> KeyEntry:
    return KeyEntry(bytes.fromhex(key.sha256.removeprefix("sha256:")), principal_for(key), revoked)


def identify(entries: list[KeyEntry], authorization: str | None, *, required: bool = False) -> Principal:
    """Map an Authorization header to a principal; no keys known (and none required) means open access."""
    if not entries and not required:
        return ANONYMOUS_ADMIN
    token = ""
    if authorization and authorization[:7].lower() == "bearer ":
        token = authorization[7:].strip()
    if not token:
        raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.")
    digest = hashlib.sha256(token.encode()).digest()
    found: KeyEntry | None = None
    for entry in entries:  # every entry is compared: the time taken does not depend on which matched
        if hmac.compare_digest(entry.digest, digest) and found is None:
            found = entry
    if found is None:
        raise AuthenticationError("Invalid API key.")
    if found.revoked:
        raise AuthenticationError("This API key has been revoked.")
    return found.principal


class Keyring:
    """The keys one server knows: lorag.toml's, plus the key store's as of its last change."""

    def __init__(self, config_keys: list[ApiKey], store: KeyStore | PostgresKeyStore | None) -> None:
        self._config = [entry_for(key) for key in config_keys]
        self._store = store
        self._lock = threading.Lock()
        self._signature: object = None
        self._loaded_at = float("-inf")
        self._entries = list(self._config)
        self._failure: tuple[float, KeyStoreError] | None = None  # the store's last failure, and when

    def entries(self) -> list[KeyEntry]:
        """Current keys; a stat per call, a re-read only when keys.json changed (or is getting old)."""
        if self._store is None:
            return self._entries
        signature = self._store.signature()
        if signature != self._signature or time.monotonic() - self._loaded_at > MAX_AGE_S:
            with self._lock:
                if signature != self._signature or time.monotonic() - self._loaded_at > MAX_AGE_S:
                    self._entries = self._config + self._load_store_or_fail()
                    if signature != self._signature:
                        log.info("api_keys_loaded", config=len(self._config), stored=len(self._entries) - len(self._config))
                    self._signature = signature
                    self._loaded_at = time.monotonic()
        return self._entries

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def config_principal(self, authorization: str | None) -> Principal | None:
        """A lorag.toml key: known without the store, so it goes on working while the store cannot
        be read (a stored key is refused then: its revocation cannot be checked)."""
        if not self._config:
            return None
        try:
            return identify(self._config, authorization, required=True)
        except AuthenticationError:
            return None

    def _load_store_or_fail(self) -> list[KeyEntry]:
        """The store's keys; after a failure, the same error for RETRY_S without asking again (a
        database that is gone would otherwise cost every request its connect timeout)."""
        now = time.monotonic()
        if self._failure is not None and now - self._failure[0] < RETRY_S:
            raise self._failure[1]
        try:
            entries = self._load_store()
        except KeyStoreError as err:
            self._failure = (now, err)
            raise
        self._failure = None
        return entries

    def _load_store(self) -> list[KeyEntry]:
        assert self._store is not None
        try:
            return [entry_for(key.as_api_key(), revoked=not key.active) for key in self._store.load()]
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'key'}: {p['msg']}" for p in err.errors())
            raise KeyStoreError(f"the key store {self._store.where} holds an invalid key ({problems})") from None


def keyring(request: Request) -> Keyring:
    """The app's keyring, made on first use from its settings."""
    state = request.app.state
    ring: Keyring | None = getattr(state, "keyring", None)
    if ring is None:
        settings = state.settings
        ring = Keyring(settings.server.api_keys, key_store(settings))
        state.keyring = ring
    return ring


async def require_key(request: Request) -> Principal:
    """FastAPI dependency: any valid key (or none configured). Async, as are the others here: a
    stat and a hash on the event loop cost less than the thread hop FastAPI gives a plain def."""
    required = bool(getattr(request.app.state, "keys_required", False))
    ring = keyring(request)
    authorization = request.headers.get("authorization")
    try:
        entries = ring.entries()
    except KeyStoreError:
        principal = ring.config_principal(authorization)
        if principal is None:
            raise
        return principal
    return identify(entries, authorization, required=required)


async def require_admin(request: Request) -> Principal:
    """FastAPI dependency: an admin key (or none configured)."""
    principal = await require_key(request)
    if not principal.admin:
        raise PermissionDenied("This endpoint needs an admin API key.")
    return principal


async def require_knowledge(request: Request) -> Principal:
    """FastAPI dependency: a key that may query knowledge bases directly (which bases: the caller's check)."""
    principal = await require_key(request)
    if not (principal.admin or principal.knowledge):
        raise PermissionDenied("This API key may not query knowledge bases directly.")
    return principal


async def require_fine_tune(request: Request) -> Principal:
    """FastAPI dependency: a key that may use files and fine-tuning (jobs take the machine's time, so it is granted)."""
    principal = await require_key(request)
    if not (principal.admin or principal.fine_tune):
        raise PermissionDenied("This API key may not use fine-tuning: it needs the fine_tune scope "
                               "(lorag keys create --fine-tune).")
    return principal
