"""/v1/knowledge over real HTTP: a minimal app with the knowledge router, served by uvicorn."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lorag.config import load_settings
from lorag.errors import LoragError
from lorag.knowledge.link import KnowledgeLink
from lorag.server.knowledge_api import router
from tests.knowledge_helpers import free_port, hold_store_lock, write_corpus

pytestmark = pytest.mark.timeout(300)
ADMIN = {"Authorization": "Bearer sk-admin-knowledge"}
USER = {"Authorization": "Bearer sk-user-knowledge"}


def build_app(settings: Any) -> FastAPI:
    app = FastAPI()
    app.state.settings = settings
    app.state.knowledge = KnowledgeLink(settings)  # what lorag.serving.build gives the real app
    app.include_router(router)

    @app.exception_handler(LoragError)
    async def lorag_error(request: Request, exc: LoragError) -> JSONResponse:
        body = {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}}
        return JSONResponse(body, status_code=exc.status_code)

    return app


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, FastAPI]]:
    allowed = tmp_path / "allowed"
    write_corpus(allowed)
    config = tmp_path / "lorag.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        "[[server.api_keys]]\nkey = \"sk-admin-knowledge\"\nadmin = true\n"
        "[[server.api_keys]]\nkey = \"sk-user-knowledge\"\n"
        f'[knowledge.ingest]\nallowed_roots = ["{allowed}"]\nmax_upload_bytes = 200000\n',
        encoding="utf-8",
    )
    app = build_app(load_settings(config))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", allowed, app
    finally:
        uv.should_exit = True
        thread.join(10)
        app.state.knowledge.close()


def test_knowledge_api(server: tuple[str, Path, FastAPI], tmp_path: Path) -> None:
    url, allowed, app = server
    with httpx.Client(base_url=url, timeout=120) as client:
        assert client.get("/v1/knowledge").status_code == 401
        assert client.get("/v1/knowledge", headers=USER).json() == {"object": "list", "data": []}
        denied = client.post("/v1/knowledge", json={"name": "manuals"}, headers=USER)
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
        created = client.post("/v1/knowledge", json={"name": "manuals", "description": "uploads"}, headers=ADMIN)
        assert created.status_code == 201 and created.json()["name"] == "manuals"
        bad_name = client.post("/v1/knowledge", json={"name": "a b"}, headers=ADMIN)
        assert bad_name.status_code == 400 and "invalid knowledge base name" in bad_name.json()["error"]["message"]

        # Upload files: a running server's knowledge changes without a restart.
        files = [
            ("files", ("guide.md", (allowed / "guide.md").read_bytes(), "text/markdown")),
            ("files", ("docs/manual.pdf", (allowed / "manual.pdf").read_bytes(), "application/pdf")),
            ("files", ("junk.txt", b"\x00\xff" * 50, "text/plain")),
        ]
        uploaded = client.post("/v1/knowledge/manuals/documents", files=files, headers=ADMIN)
        assert uploaded.status_code == 200, uploaded.text
        report = uploaded.json()
        assert sorted(report["added"]) == ["upload:docs/manual.pdf", "upload:guide.md"]
        assert report["failed"] == 1 and report["skipped"][0]["source"] == "upload:junk.txt"

        answer = client.post(
            "/v1/knowledge/manuals/query", json={"query": "exoplanet transit photometry", "top_k": 2}, headers=USER
        )
        assert answer.status_code == 200
        hits = answer.json()["hits"]
        assert hits[0]["source"] == "upload:docs/manual.pdf" and hits[0]["metadata"]["page"] == 2
        assert set(hits[0]) >= {"source", "text", "score", "metadata"}
        for mode in ("vector", "keyword", "hybrid"):
            got = client.post(
                "/v1/knowledge/manuals/query",
                json={"query": "sourdough starter", "mode": mode, "filters": {"file_type": "markdown"}},
                headers=USER,
            ).json()["hits"]
            assert got and {h["source"] for h in got} == {"upload:guide.md"}, mode

        # Re-uploading a changed file replaces its chunks.
        changed = client.post(
            "/v1/knowledge/manuals/documents",
            files=[("files", ("guide.md", b"# Guide\n\nRye starters want dark flour twice a day.", "text/markdown"))],
            headers=ADMIN,
        ).json()
        assert changed["updated"] == ["upload:guide.md"]
        top = client.post("/v1/knowledge/manuals/query", json={"query": "rye flour", "top_k": 1}, headers=USER).json()
        assert "Rye" in top["hits"][0]["text"]

        too_big = client.post(
            "/v1/knowledge/manuals/documents", files=[("files", ("big.txt", b"a " * 150000, "text/plain"))], headers=ADMIN
        )
        assert too_big.status_code == 413 and "too large" in too_big.json()["error"]["message"]
        sneaky = client.post(
            "/v1/knowledge/manuals/documents", files=[("files", ("../../etc/x.md", b"# x\n\ny", "text/plain"))], headers=ADMIN
        )
        assert sneaky.status_code == 400

        # Server-side paths: only under the allowed roots.
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret.txt").write_text("the password is swordfish", encoding="utf-8")
        refused = client.post("/v1/knowledge/manuals/ingest", json={"paths": [str(outside / "secret.txt")]}, headers=ADMIN)
        assert refused.status_code == 403 and "outside the allowed roots" in refused.json()["error"]["message"]
        escape = client.post(
            "/v1/knowledge/manuals/ingest", json={"paths": [str(allowed / ".." / "outside" / "secret.txt")]}, headers=ADMIN
        )
        assert escape.status_code == 403
        (allowed / "link.txt").symlink_to(outside / "secret.txt")
        ingested = client.post("/v1/knowledge/manuals/ingest", json={"paths": [str(allowed)]}, headers=ADMIN)
        assert ingested.status_code == 200
        body = ingested.json()
        assert len(body["added"]) == 8 and any(s["kind"] == "not_allowed" for s in body["skipped"])
        missing = client.post("/v1/knowledge/manuals/ingest", json={"paths": [str(allowed / "nope.md")]}, headers=ADMIN)
        assert missing.status_code == 400 and "no such file" in missing.json()["error"]["message"]
        assert "swordfish" not in client.post(
            "/v1/knowledge/manuals/query", json={"query": "password swordfish", "top_k": 20}, headers=USER
        ).text

        # Uploading into a knowledge base that does not exist: 404, unless asked to create it.
        note = [("files", ("note.txt", b"Kites fly best in steady wind.", "text/plain"))]
        assert client.post("/v1/knowledge/kites/documents", files=note, headers=ADMIN).status_code == 404
        fresh = client.post("/v1/knowledge/kites/documents", files=note, data={"create": "true"}, headers=ADMIN)
        assert fresh.status_code == 200 and fresh.json()["added"] == ["upload:note.txt"]
        assert client.delete("/v1/knowledge/kites", headers=ADMIN).status_code == 200

        # List, show, remove, drop.
        listed = client.get("/v1/knowledge", headers=USER).json()["data"]
        assert listed[0]["name"] == "manuals" and listed[0]["documents"] == 10
        shown = client.get("/v1/knowledge/manuals", headers=USER).json()
        assert shown["chunks"] >= 10 and shown["embedding_model"] == "all-MiniLM-L6-v2"
        removed = client.delete("/v1/knowledge/manuals/documents", params={"source": "upload:guide.md"}, headers=ADMIN)
        assert removed.status_code == 200 and removed.json()["removed"] == ["upload:guide.md"]
        gone = client.delete("/v1/knowledge/manuals/documents", params={"source": "upload:guide.md"}, headers=ADMIN)
        assert gone.status_code == 404
        assert client.post("/v1/knowledge/nope/query", json={"query": "x"}, headers=USER).status_code == 404
        bad_mode = client.post("/v1/knowledge/manuals/query", json={"query": "x", "mode": "fuzzy"}, headers=USER)
        assert bad_mode.status_code == 422
        assert client.delete("/v1/knowledge/manuals", headers=USER).status_code == 403
        assert client.delete("/v1/knowledge/manuals", headers=ADMIN).json() == {"name": "manuals", "deleted": True}
        assert client.get("/v1/knowledge", headers=USER).json()["data"] == []
    assert app.state.knowledge.opened() is not None


def test_the_api_reports_a_store_held_by_another_process(tmp_path: Path) -> None:

    from tests.knowledge_helpers import ROOT

    config = tmp_path / "lorag.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n', encoding="utf-8")
    holder = hold_store_lock(tmp_path / "state", cwd=ROOT)
    app = build_app(load_settings(config))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        while not uv.started:
            time.sleep(0.05)
        busy = httpx.get(f"http://127.0.0.1:{port}/v1/knowledge", timeout=30)
        assert busy.status_code == 423
        assert f"in use by process {holder.pid}" in busy.json()["error"]["message"]
        holder.kill()
        holder.wait()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/knowledge", timeout=30).status_code == 200
    finally:
        holder.kill()
        uv.should_exit = True
        thread.join(10)
        app.state.knowledge.close()
