"""Admin routes (admin API key): load, list, switch and unload adapters at run time."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from lorag.adapters.registry import version_to_json
from lorag.adapters.service import AdapterService
from lorag.server import metrics
from lorag.server.auth import Principal, require_admin

router = APIRouter(prefix="/admin")


class AddAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    version: str | None = None
    activate: bool = True


class Activate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1)
    # Compare-and-swap: activate only if the name still points at this version (else 409).
    if_current: str | None = None


async def get_adapters(request: Request) -> AdapterService:
    service: AdapterService = request.app.state.adapters
    return service


@router.get("/adapters")
async def list_adapters(
    service: AdapterService = Depends(get_adapters), _: Principal = Depends(require_admin)
) -> dict[str, Any]:
    return {"data": service.list()}


@router.get("/adapters/{name}")
async def show_adapter(
    name: str, request: Request, service: AdapterService = Depends(get_adapters),
    _: Principal = Depends(require_admin),
) -> dict[str, Any]:
    """The name's versions; behind a fleet, where each version is loaded and who refused it."""
    described = service.registry.describe(name)
    servers = fleet_status(request)
    if servers is not None:
        for version in described["versions"]:
            ref = f"{name}@{version['version']}"
            version["servers"] = {s["name"]: ("loaded" if ref in s["adapters"] else
                                              f"refused: {s['refused'][ref]}" if ref in s["refused"] else
                                              "not loaded") for s in servers}
    return described


@router.get("/fleet")
async def show_fleet(request: Request, _: Principal = Depends(require_admin)) -> dict[str, Any]:
    """The vLLM servers behind `[engine] backend = "remote"`: up, load, adapters, refusals, repairs."""
    servers = fleet_status(request)
    if servers is None:
        return {"backend": "local", "servers": []}
    engine = request.app.state.pipeline.engine
    return {"backend": "remote", "leader": engine.leading, "pid": os.getpid(), "servers": servers}


def fleet_status(request: Request) -> list[dict[str, Any]] | None:
    """Per-server status when the engine is a fleet, else None."""
    from lorag.fleet.control import fleet_status as status_of

    return status_of(request.app.state.pipeline.engine)


@router.post("/adapters", status_code=201)
async def add_adapter(
    body: AddAdapter, service: AdapterService = Depends(get_adapters), _: Principal = Depends(require_admin)
) -> dict[str, Any]:
    entry = await service.add(body.name, Path(body.path), version=body.version, activate=body.activate)
    return version_to_json(entry)


@router.post("/adapters/{name}/activate")
async def activate_adapter(
    name: str, body: Activate, service: AdapterService = Depends(get_adapters),
    _: Principal = Depends(require_admin),
) -> dict[str, Any]:
    entry = await asyncio.to_thread(service.registry.activate, name, body.version, if_current=body.if_current)
    return version_to_json(entry)


@router.delete("/adapters/{name}")
async def remove_adapter(
    name: str, request: Request, version: str | None = None, service: AdapterService = Depends(get_adapters),
    _: Principal = Depends(require_admin),
) -> dict[str, Any]:
    """Forget the version(s) now; each is unloaded, its files deleted and its metric series
    dropped once the last request holding it has finished."""
    removed = await service.remove(name, version, on_released=metrics.forget_adapter(request))
    return {"removed": [entry.ref for entry in removed]}
