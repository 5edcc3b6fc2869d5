"""Start-up warm-up, in process: each part logs an event, a broken knowledge base does not stop it,
and /ready says what it still waits for. (On a real server: tests/test_domains.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from fastapi.testclient import TestClient

from lorag.config import Settings, load_settings
from lorag.knowledge.link import KnowledgeLink
from lorag.serving.domains import DomainCatalog
from lorag.serving.routing import Router
from lorag.serving.warmup import warm_up

CONFIG = """
[domains.legal]
description = "Tenancy law: landlords, tenants, deposits."
examples = { select = "similar", k = 1, items = [
  { question = "When is the deposit returned?", answer = "Within 14 days." },
  { question = "Who repairs the roof?", answer = "The landlord." },
] }
knowledge = { bases = ["missing-kb"] }

[domains.plain]
"""


def settings_for(tmp_path: Path, config: str = CONFIG) -> Settings:
    path = tmp_path / "lorag.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n[model]\npath = "unused"\n' + config)
    return load_settings(path)


def test_warm_up_logs_every_part_and_a_missing_knowledge_base_is_logged_not_raised(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    catalog = DomainCatalog(settings)
    knowledge = KnowledgeLink(settings)
    router = Router(settings, catalog, knowledge)
    try:
        with structlog.testing.capture_logs() as events:
            report = warm_up(knowledge, catalog, router)
    finally:
        knowledge.close()
    warm = {(e["part"], e.get("kb")): e for e in events if e["event"] == "warmup"}
    assert warm[("embeddings", None)]["ok"] and warm[("routing", None)]["ok"]
    failed = warm[("knowledge", "missing-kb")]
    assert not failed["ok"] and "missing-kb" in failed["error"] and failed["log_level"] == "warning"
    assert warm[("total", None)]["failed"] == ["knowledge:missing-kb"]
    assert set(report.durations_ms) == {"embeddings", "routing", "knowledge:missing-kb", "total"}
    # The routing vectors and the 'similar' examples' vectors were embedded by the warm-up.
    legal = catalog.get("legal")
    assert legal._vectors is not None and "legal" in router._profiles


def test_warm_up_without_domains_loads_nothing(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, config="")
    catalog = DomainCatalog(settings)
    with structlog.testing.capture_logs() as events:
        knowledge = KnowledgeLink(settings)
        report = warm_up(knowledge, catalog, Router(settings, catalog, knowledge))
    assert [e["part"] for e in events if e["event"] == "warmup"] == ["total"]
    assert not report.failed and not [e for e in events if e["event"] == "kb.embedding.load"]


class StartedEngine:
    """An engine that is already up: the app's lifespan then only warms up and preloads."""

    llm: Any = object()
    started = True
    alive = True

    async def check_health(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None


def test_ready_says_it_waits_for_the_warmup_while_health_answers(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from lorag.server import app as server

    release = threading.Event()

    def slow_warmup(knowledge: KnowledgeLink, catalog: DomainCatalog, router: Router,
                    on_done: Callable[[], None]) -> threading.Event:
        def run() -> None:
            release.wait(60)
            on_done()

        threading.Thread(target=run, daemon=True).start()
        return threading.Event()

    monkeypatch.setattr(server, "start_warmup", slow_warmup)
    app = server.create_app(settings_for(tmp_path, config=""), engine=StartedEngine())  # type: ignore[arg-type]
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
        waiting = http.get("/ready")
        assert waiting.status_code == 503
        assert waiting.json()["waiting_for"] == ["warmup"] and waiting.json()["error"]["code"] == "not_ready"
        release.set()
        assert poll_ready(http).json()["status"] == "ready"


def poll_ready(http: TestClient, attempts: int = 200) -> Any:
    """/ready until it answers 200 (the warm-up's end reaches the loop through call_soon_threadsafe)."""
    for _ in range(attempts):
        response = http.get("/ready")
        if response.status_code == 200:
            return response
        time.sleep(0.05)
    raise AssertionError(f"/ready never became 200: {response.json()}")
