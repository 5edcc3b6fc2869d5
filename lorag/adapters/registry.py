"""The adapter registry: names, versions, engine ids, persisted in the state directory.

A registered adapter is copied under the state directory so that a version is
immutable (editing the source directory later changes nothing that is served)
and so that a restart finds everything it served before. Engine ids
(`lora_int_id`) are never reused: a new version always gets a new id, so the
engine can never serve stale weights under a recycled id.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lorag.adapters.validate import AdapterInfo, AdapterInvalid
from lorag.errors import ConflictError, LoragError, NotFoundError
from lorag.logging import get_logger

# ':' for fine-tuned models' OpenAI ids (ft:<base>:<org>:<suffix>:<job-id>[:ckpt-step-N]).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,191}$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
REGISTRY_FILE = "registry.json"
log = get_logger("lorag.adapters")


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable version of a named adapter, as the engine will load it."""

    name: str
    version: str
    lora_int_id: int
    path: str
    source: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    created_at: float
    # The key id that made it (a fine-tuning job's): only that key and admins may name it as
    # `model`, unless a domain exposes it. None: every key that may use adapters.
    owner: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class _Named:
    current: str
    versions: dict[str, AdapterVersion] = field(default_factory=dict)


def split_ref(ref: str) -> tuple[str, str | None]:
    """'legal@v2' -> ('legal', 'v2'); 'legal' -> ('legal', None)."""
    name, _, version = ref.partition("@")
    return name, (version or None)


def check_name(name: str, version: str | None = None) -> None:
    if not NAME_PATTERN.match(name):
        raise AdapterInvalid(
            f"Adapter name {name!r} is invalid: use letters, digits, '.', '_', ':' or '-' (max 192), "
            "starting with a letter or digit."
        )
    if version is not None and not VERSION_PATTERN.match(version):
        raise AdapterInvalid(f"Adapter version {version!r} is invalid: use letters, digits, '.', '_' or '-' (max 32).")


class RegistryDocument(Protocol):
    """Where the registry's one JSON document lives: registry.json, or a row every replica shares."""

    where: str

    def read(self) -> dict[str, Any] | None: ...

    def locked(self) -> AbstractContextManager[None]: ...  # writers one at a time, everywhere

    def write(self, data: dict[str, Any]) -> None: ...  # inside locked()

    def generation(self) -> int: ...  # moves when another process may have changed the document

    def close(self) -> None: ...


class RegistryFile:
    """`<root>/registry.json`, rewritten atomically; writers serialised by a lock file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / REGISTRY_FILE
        self.where = str(self.path)

    def read(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise LoragError(f"Adapter registry {self.path} is unreadable: {err}") from None
        return data

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers across processes (the CLI and a server on the same state dir)."""
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def write(self, data: dict[str, Any]) -> None:
        _write_atomically(self.path, json.dumps(data, indent=2))

    def generation(self) -> int:
        """Moves when the file was replaced (every write is a rename): workers and the CLI on one
        state directory see each other's changes at their next look, for the price of a stat."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return 0
        return hash((stat.st_ino, stat.st_mtime_ns, stat.st_size))

    def close(self) -> None:
        pass


class AdapterRegistry:
    """Thread-safe registry: one JSON document (registry.json, or a shared database row) and
    the adapters' files under `<root>/adapters`. Every write re-reads the document under the
    writers' lock first, so nothing cached is ever written back."""

    def __init__(self, state_dir: Path, document: RegistryDocument | None = None) -> None:
        self.root = state_dir / "adapters"
        self.root.mkdir(parents=True, exist_ok=True)
        self.document = document or RegistryFile(self.root)
        self._lock = threading.RLock()
        self._names: dict[str, _Named] = {}
        self._next_id = 1
        self._generation = self.document.generation()
        self._load()

    # -- reading -----------------------------------------------------------------

    def resolve(self, ref: str) -> AdapterVersion:
        """The version a request for `ref` gets now ('name' -> its current version)."""
        self._refresh()
        return self._resolve_loaded(ref)

    def _resolve_loaded(self, ref: str) -> AdapterVersion:
        """resolve() on the document as last read (writers: just read under the lock)."""
        name, version = split_ref(ref)
        with self._lock:
            named = self._names.get(name)
            if named is None:
                raise NotFoundError(f"The model '{ref}' does not exist.", param="model")
            chosen = version or named.current
            entry = named.versions.get(chosen)
            if entry is None:
                known = ", ".join(sorted(named.versions))
                raise NotFoundError(
                    f"The model '{ref}' does not exist (versions of '{name}': {known}).", param="model"
                )
            return entry

    def current(self) -> list[AdapterVersion]:
        """The current version of every name."""
        self._refresh()
        with self._lock:
            return [n.versions[n.current] for _, n in sorted(self._names.items())]

    def all_versions(self) -> list[AdapterVersion]:
        self._refresh()
        with self._lock:
            return [v for _, n in sorted(self._names.items()) for _, v in sorted(n.versions.items())]

    def describe(self, name: str) -> dict:
        self._refresh()
        with self._lock:
            named = self._names.get(name)
            if named is None:
                raise NotFoundError(f"No adapter named '{name}'.")
            return {
                "name": name,
                "current": named.current,
                "versions": [version_to_json(v) for _, v in sorted(named.versions.items())],
            }

    # -- writing -----------------------------------------------------------------

    def register(
        self,
        name: str,
        source: Path,
        info: AdapterInfo,
        *,
        version: str | None = None,
        activate: bool = True,
        owner: str | None = None,
    ) -> AdapterVersion:
        """Copy a validated adapter in and record it; `activate` makes it the name's current version."""
        check_name(name, version)
        with self._lock, self._file_lock():
            named = self._names.get(name)
            version = version or self._next_version(named)
            if named and version in named.versions:
                raise ConflictError(f"Adapter {name}@{version} already exists; pick a new version.")
            target = self.root / name / version
            if target.exists():  # a removed version of that name that requests still hold: keep its files
                target = self.root / name / f"{version}.{self._next_id}"
            _copy_atomically(source, target)
            entry = AdapterVersion(
                name=name,
                version=version,
                lora_int_id=self._next_id,
                path=str(target),
                source=str(source),
                rank=info.rank,
                alpha=info.alpha,
                target_modules=info.target_modules,
                base_model=info.base_model,
                created_at=time.time(),
                owner=owner,
            )
            self._next_id += 1
            if named is None:
                named = self._names[name] = _Named(current=version)
            named.versions[version] = entry
            if activate:
                named.current = version
            self._save()
            return entry

    def reserve_id(self) -> int:
        """An engine id no version will ever get: to load a candidate before it is registered (a canary)."""
        with self._lock, self._file_lock():
            reserved = self._next_id
            self._next_id += 1
            self._save()
            return reserved

    def activate(self, name: str, version: str, *, if_current: str | None = None) -> AdapterVersion:
        """Point `name` at `version`; requests already running keep the version they started with.

        `if_current` makes it a compare-and-swap: refused (409) unless `name` still points there
        when the writers' lock is held, so of two replicas switching from the same version, one wins.
        """
        with self._lock, self._file_lock():
            entry = self._resolve_loaded(f"{name}@{version}")
            if if_current is not None and self._names[name].current != if_current:
                raise ConflictError(f"Adapter {name} is at {self._names[name].current}, not {if_current}: "
                                    "someone else activated a version first.", code="activation_conflict")
            self._names[name].current = version
            self._save()
            return entry

    def unregister(self, name: str, version: str | None = None) -> list[AdapterVersion]:
        """Forget one version (or all of a name); returns what was removed. Files are deleted by the caller."""
        with self._lock, self._file_lock():
            named = self._names.get(name)
            if named is None:
                raise NotFoundError(f"No adapter named '{name}'.")
            if version is None:
                removed = list(named.versions.values())
                del self._names[name]
            else:
                entry = named.versions.pop(version, None)
                if entry is None:
                    raise NotFoundError(f"No adapter version '{name}@{version}'.")
                removed = [entry]
                if not named.versions:
                    del self._names[name]
                elif named.current == version:
                    named.current = max(named.versions.values(), key=lambda v: v.created_at).version
            self._save()
            return removed

    def delete_files(self, entry: AdapterVersion) -> None:
        shutil.rmtree(entry.path, ignore_errors=True)
        parent = Path(entry.path).parent
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()

    # -- persistence -------------------------------------------------------------

    def _next_version(self, named: _Named | None) -> str:
        numbers = [int(v[1:]) for v in (named.versions if named else {}) if re.fullmatch(r"v\d+", v)]
        return f"v{max(numbers, default=0) + 1}"

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Writers one at a time across processes and replicas, each on the latest document."""
        with self.document.locked():
            self._load()
            yield

    def _refresh(self) -> None:
        """Re-read the document when another process may have changed it (a shared database's NOTIFY).

        If it cannot be read now, requests go on with the versions last read (logged), and the next
        change the listener counts (it counts its reconnect attempts too) tries again.
        """
        generation = self.document.generation()
        if generation != self._generation:
            with self._lock:
                self._generation = generation
                try:
                    self._load()
                except LoragError as err:
                    log.warning("adapter_registry_stale", where=self.document.where, error=err.message)

    def _load(self) -> None:
        data = self.document.read()
        if data is None:
            return
        self._next_id = int(data.get("next_id", 1))
        names: dict[str, _Named] = {}
        for name, raw in data.get("adapters", {}).items():
            versions = {
                v: AdapterVersion(**{**e, "target_modules": tuple(e["target_modules"])})
                for v, e in raw["versions"].items()
            }
            names[name] = _Named(current=raw["current"], versions=versions)
        self._names = names

    def _save(self) -> None:
        data = {
            "next_id": self._next_id,
            "adapters": {
                name: {
                    "current": n.current,
                    "versions": {v: version_to_json(e) for v, e in n.versions.items()},
                }
                for name, n in self._names.items()
            },
        }
        self.document.write(data)


def version_to_json(entry: AdapterVersion) -> dict:
    data = asdict(entry)
    data["target_modules"] = list(entry.target_modules)
    return data


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy the adapter's config and weights (only) so a crash never leaves half a version."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for item in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(source / item, staging / item)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
