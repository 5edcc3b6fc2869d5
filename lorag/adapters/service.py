"""Adding and removing adapters: validation, the registry and (when serving) the engine together.

The server's admin API and the offline CLI both go through this one class, so
the same checks guard both doors.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import threading
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from lorag.adapters.leases import removal_grace_s
from lorag.adapters.registry import AdapterRegistry, AdapterVersion, check_name, version_to_json
from lorag.adapters.validate import check_inside_roots, model_module_names, validate_adapter
from lorag.config import Settings
from lorag.logging import get_logger
from lorag.state.leader import has_peers

log = get_logger("lorag.adapters")


class AdapterLoader(Protocol):
    """What the service needs of an engine (lorag.engine.Engine is one): load now, unload when unused."""

    async def load_adapter(self, adapter: AdapterVersion) -> None: ...

    def retire_adapter(self, adapter: AdapterVersion, on_released: Callable[[], Any] | None = None) -> None:
        """Unload once no request holds it, then call `on_released()` in a thread."""


class AdapterService:
    def __init__(self, settings: Settings, registry: AdapterRegistry, engine: AdapterLoader | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.engine = engine

    @property
    def allowed_roots(self) -> list[Path]:
        return [Path(r) for r in self.settings.adapters.allowed_roots] + [self.settings.state_path]

    @cached_property
    def _model_modules(self) -> set[str]:
        return model_module_names(self.settings.model.path)

    def validate(self, name: str, path: Path, version: str | None, trusted: bool) -> tuple[Path, Any]:
        check_name(name, version)
        source = path.expanduser().resolve() if trusted else check_inside_roots(path, self.allowed_roots)
        info = validate_adapter(
            source,
            served_model=self.settings.model.path,
            model_module_names=self._model_modules,
            max_lora_rank=self.settings.engine.max_lora_rank,
        )
        return source, info

    async def add(
        self, name: str, path: Path, *, version: str | None = None, activate: bool = True, trusted: bool = False,
        owner: str | None = None,
    ) -> AdapterVersion:
        """Validate, copy in, load into the engine, then make it visible (in that order)."""
        source, info = await asyncio.to_thread(self.validate, name, path, version, trusted)
        # Registered but not yet current, so no request can reach it before the engine has it.
        entry = await asyncio.to_thread(self.registry.register, name, source, info, version=version, activate=False,
                                  owner=owner)
        if self.engine is not None:
            try:
                await self.engine.load_adapter(entry)
            except Exception as err:
                await asyncio.to_thread(self._forget, entry)
                from lorag.adapters.validate import AdapterInvalid

                raise AdapterInvalid(f"The engine refused adapter {entry.ref}: {err}") from None
        if activate:
            entry = await asyncio.to_thread(self.registry.activate, entry.name, entry.version)
        log.info("adapter_added", adapter=entry.ref, lora_int_id=entry.lora_int_id, rank=entry.rank)
        return entry

    def _forget(self, entry: AdapterVersion) -> None:
        self.registry.unregister(entry.name, entry.version)
        self.registry.delete_files(entry)

    async def remove(self, name: str, version: str | None = None,
                     on_released: Callable[[AdapterVersion], Any] | None = None) -> list[AdapterVersion]:
        """Forget now (the registry's file lock and fsync in a thread); unload and delete files once
        no request holds the version any more (lorag.adapters.leases), then `on_released(version)`."""
        removed = await asyncio.to_thread(self.registry.unregister, name, version)
        for entry in removed:
            released = functools.partial(self._released, entry, on_released)
            if self.engine is not None:
                self.engine.retire_adapter(entry, on_released=released)
            else:
                released()
            log.info("adapter_removed", adapter=entry.ref)
        return removed

    def _released(self, entry: AdapterVersion, then: Callable[[AdapterVersion], Any] | None) -> None:
        if self.shared:
            self._delete_later(entry)
        else:
            self.registry.delete_files(entry)
        if then is not None:
            then(entry)

    @property
    def shared(self) -> bool:
        """Replicas or workers share the registry and its files: another may still answer with a
        removed version."""
        return has_peers(self.settings)

    @property
    def grace_s(self) -> float:
        """How long a removed version's files outlive its removal when replicas share them."""
        return removal_grace_s(self.settings)

    def _delete_later(self, entry: AdapterVersion) -> None:
        timer = threading.Timer(self.grace_s, self.registry.delete_files, [entry])
        timer.daemon = True  # a process that stops first leaves them to the next start's sweep
        timer.start()
        log.info("adapter_files_kept", adapter=entry.ref, for_s=self.grace_s)

    def sweep(self) -> list[Path]:
        """Delete version folders no registered version uses, older than the grace (removed by a
        replica that stopped before its timer fired); fresh ones may be an add in progress."""
        if not self.shared:
            return []
        used = {Path(entry.path).resolve() for entry in self.registry.all_versions()}
        cutoff = time.time() - self.grace_s
        swept = []
        for folder in self.registry.root.glob("*/*"):
            if folder.is_dir() and not folder.name.startswith(".") and folder.resolve() not in used \
                    and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                swept.append(folder)
        if swept:
            log.info("adapter_files_swept", folders=[str(f) for f in swept])
        return swept

    def list(self) -> list[dict[str, Any]]:
        current = {(e.name, e.version) for e in self.registry.current()}
        return [
            {**version_to_json(e), "current": (e.name, e.version) in current}
            for e in self.registry.all_versions()
        ]
