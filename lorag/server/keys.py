"""The API key store: `<state_dir>/keys.json`, managed with `lorag keys`.

Only a sha256 of each key is kept (plus a short prefix so a person can tell keys
apart); the secret is shown once, when it is created. Keys are high-entropy random
tokens, so a plain (unsalted) sha256 is enough: there is nothing to guess.

Writes go to a temporary file that replaces keys.json in one step (os.replace), so
a server reading it never sees half a file, and a revocation is one such write: the
server notices the new file on its next request (see lorag.server.auth). A lock file
serialises concurrent `lorag keys` runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorag.config import ApiKey
from lorag.errors import ConflictError, LoragError, NotFoundError
from lorag.schema import now_iso

KEYS_FILE = "keys.json"
TOKEN_PREFIX = "lrg-"
PREFIX_CHARS = 12  # "lrg-" + 8 characters of the token: enough to tell keys apart, useless to guess with
FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyStoreError(LoragError):
    """keys.json cannot be read or written; nobody is let in on a store we cannot read."""

    status_code = 500
    error_type = "server_error"
    code = "key_store_unreadable"


class UnknownKey(NotFoundError):
    code = "unknown_key"


@dataclass(frozen=True)
class Scopes:
    admin: bool = False
    domains: tuple[str, ...] | None = None  # None: every domain
    knowledge: bool = True
    overrides: bool = True
    fine_tune: bool = False  # granted, never implied: a keys.json written before it existed loads without it

    @classmethod
    def of(cls, key: ApiKey) -> Scopes:
        return cls(admin=key.admin, domains=tuple(key.domains) if key.domains is not None else None,
                   knowledge=key.knowledge, overrides=key.overrides, fine_tune=key.fine_tune)

    def to_json(self) -> dict[str, Any]:
        return {"admin": self.admin, "domains": list(self.domains) if self.domains is not None else None,
                "knowledge": self.knowledge, "overrides": self.overrides, "fine_tune": self.fine_tune}

    def describe(self) -> str:
        if self.admin:
            return "admin"
        parts = ["domains=" + (",".join(self.domains) if self.domains is not None else "*")]
        parts.append("knowledge" if self.knowledge else "no-knowledge")
        parts.append("overrides" if self.overrides else "no-overrides")
        if self.fine_tune:
            parts.append("fine-tune")
        return " ".join(parts)


@dataclass(frozen=True)
class StoredKey:
    id: str
    name: str
    prefix: str
    hash: str  # "sha256:<hex>"
    created_at: str
    revoked_at: str | None = None
    scopes: Scopes = field(default_factory=Scopes)

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "scopes": self.scopes.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredKey:
        scopes = dict(data.get("scopes") or {})
        if scopes.get("domains") is not None:
            scopes["domains"] = tuple(scopes["domains"])
        return cls(**{**data, "scopes": Scopes(**scopes)})

    def public(self) -> dict[str, Any]:
        """What `lorag keys list` may show: everything but the hash."""
        data = self.to_json()
        del data["hash"]
        return data

    def as_api_key(self) -> ApiKey:
        """The same shape as a lorag.toml key, so one code path authenticates both."""
        return ApiKey(
            hash=self.hash,
            name=self.name,
            admin=self.scopes.admin,
            domains=list(self.scopes.domains) if self.scopes.domains is not None else None,
            knowledge=self.scopes.knowledge,
            overrides=self.scopes.overrides,
            fine_tune=self.scopes.fine_tune,
        )


def new_secret() -> str:
    """A fresh key: 256 random bits, URL-safe, recognisable by its `lrg-` prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def new_key(name: str, *, taken_ids: set[str], admin: bool = False, domains: list[str] | None = None,
            knowledge: bool = True, overrides: bool = True, fine_tune: bool = False,
            reserved_names: frozenset[str] = frozenset()) -> tuple[StoredKey, str]:
    """A new key (checked: its name and scopes) and its secret, for a store to keep."""
    if not NAME_RE.match(name):
        raise LoragError(f"invalid key name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)",
                         param="name")
    try:
        ApiKey.check_scopes(admin, domains, knowledge, overrides)
    except ValueError as err:
        raise LoragError(str(err)) from None
    if name in reserved_names:
        raise ConflictError(f"a key named {name!r} is already configured in lorag.toml", code="duplicate_key")
    key_id = "key_" + secrets.token_hex(4)
    while key_id in taken_ids:
        key_id = "key_" + secrets.token_hex(4)
    secret = new_secret()
    scopes = Scopes(admin=admin, domains=tuple(domains) if domains is not None else None,
                    knowledge=knowledge, overrides=overrides, fine_tune=fine_tune)
    return StoredKey(id=key_id, name=name, prefix=secret[:PREFIX_CHARS], hash=hash_secret(secret),
                     created_at=now_iso(), scopes=scopes), secret


def duplicate_name(name: str) -> ConflictError:
    return ConflictError(f"a key named {name!r} already exists; revoke it first or pick another name",
                         code="duplicate_key")


def check_name_free(keys: list[StoredKey], name: str) -> None:
    """One active key per name: domains grant access by key name."""
    if any(k.name == name and k.active for k in keys):
        raise duplicate_name(name)


def find_key(keys: list[StoredKey], name_or_id: str) -> int:
    """By id, or by the name of an active key (else the latest revoked one of that name)."""
    for index, key in enumerate(keys):
        if key.id == name_or_id:
            return index
    matches = [i for i, k in enumerate(keys) if k.name == name_or_id]
    active = [i for i in matches if keys[i].active]
    if active:
        return active[0]
    if matches:
        return matches[-1]
    raise UnknownKey(f"no key with name or id {name_or_id!r} (see `lorag keys list`)")


def revoked_copy(key: StoredKey, name_or_id: str) -> StoredKey:
    """The key, revoked now; the entry stays (so the key stays refused)."""
    if not key.active:
        raise ConflictError(f"key {name_or_id!r} was already revoked at {key.revoked_at}", code="already_revoked")
    return StoredKey(**{**key.__dict__, "revoked_at": now_iso()})


class KeyStore:
    """Keys in `<state_dir>/keys.json`; every method re-reads the file (other processes write it)."""

    def __init__(self, state_path: Path) -> None:
        self.path = Path(state_path) / KEYS_FILE
        self.where = str(self.path)

    def close(self) -> None:
        """Nothing held open (the database store has a connection and a listener)."""

    def signature(self) -> tuple[int, int, int, int] | None:
        """Changes whenever keys.json is replaced: a cheap stat tells a server to re-read it."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> list[StoredKey]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as err:
            raise KeyStoreError(f"cannot read the key store {self.path}: {err.strerror}") from None
        try:
            data = json.loads(text)
            return [StoredKey.from_json(entry) for entry in data["keys"]]
        except (ValueError, KeyError, TypeError) as err:
            raise KeyStoreError(f"the key store {self.path} is damaged ({type(err).__name__}); "
                                "restore it from a backup or move it away and create new keys") from None

    def has_keys(self) -> bool:
        """Any key, revoked ones included: once keys exist, the server never falls back to open access."""
        return bool(self.load())

    def create(self, name: str, **scopes: Any) -> tuple[StoredKey, str]:
        """A new key and its secret (new_key's options); the secret exists only in the return value."""
        with self._locked():
            keys = self.load()
            check_name_free(keys, name)
            entry, secret = new_key(name, taken_ids={k.id for k in keys}, **scopes)
            self._write([*keys, entry])
        return entry, secret

    def revoke(self, name_or_id: str) -> StoredKey:
        """Revoke by id, or by the name of an active key; the entry stays (so the key stays refused)."""
        with self._locked():
            keys = self.load()
            index = find_key(keys, name_or_id)
            keys[index] = revoked = revoked_copy(keys[index], name_or_id)
            self._write(keys)
        return revoked


    def _write(self, keys: list[StoredKey]) -> None:
        payload = json.dumps({"version": FORMAT_VERSION, "keys": [k.to_json() for k in keys]}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{KEYS_FILE}.")  # created 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(KEYS_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise KeyStoreError(f"cannot write the key store in {self.path.parent}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
