"""A Chroma server that stops and comes back, under a running lorag server (real `chroma run`, real HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lorag.config import load_settings
from tests.conftest import USER_KEY, Models, Server, start_server
from tests.knowledge_helpers import ChromaServer

pytestmark = pytest.mark.timeout(600)

QUESTION = "When must the landlord return the deposit?"


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    path = tmp_path_factory.mktemp("chroma-faults") / "data"
    path.mkdir()
    server = ChromaServer(path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lorag_server(models: Models, chroma: ChromaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from lorag.knowledge.service import KnowledgeService

    workdir = tmp_path_factory.mktemp("chroma-faults-lorag")
    knowledge = f"""
[knowledge.chroma]
mode = "http"
port = {chroma.port}
"""
    settings = load_settings(overrides={"state_dir": str(workdir / "state"), "knowledge.chroma.mode": "http",
                                        "knowledge.chroma.port": chroma.port})
    service = KnowledgeService.from_settings(settings)
    corpus = workdir / "corpus"
    corpus.mkdir()
    (corpus / "statutes.md").write_text("A landlord must return the tenancy deposit within 14 days.")
    try:
        service.create("law")
        service.ingest_paths("law", [str(corpus)])
    finally:
        service.close()
    domains = """
[domains.strict]
knowledge = { bases = ["law"], timeout_s = 5 }
[domains.lenient]
knowledge = { bases = ["law"], on_error = "continue", timeout_s = 5 }
"""
    srv = start_server(models, workdir, extra_config=knowledge + domains)
    yield srv
    srv.stop()


def ask(server: Server, model: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=server.api, api_key=USER_KEY, max_retries=0, timeout=60)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=4, temperature=0)


def citations(reply: openai.types.chat.ChatCompletion) -> list[dict]:
    return list((reply.model_extra or {})["lorag"]["citations"])


def test_chroma_down_gives_clear_errors_or_answers_without_retrieval_then_recovers(
    lorag_server: Server, chroma: ChromaServer
) -> None:
    assert citations(ask(lorag_server, "strict"))
    assert citations(ask(lorag_server, "lenient"))
    port, path = chroma.port, chroma.path
    chroma.stop()
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            ask(lorag_server, "strict")
        assert caught.value.status_code == 503
        error = caught.value.body
        assert isinstance(error, dict) and error["code"] == "knowledge_unavailable"
        assert "strict" in error["message"]
        lenient = ask(lorag_server, "lenient")
        info = (lenient.model_extra or {})["lorag"]
        assert info["citations"] == [] and info["retrieval"]["skipped"] is True
        assert httpx.get(f"{lorag_server.url}/ready", timeout=30).status_code == 200  # the server itself is fine
    finally:
        restarted = _start_on(path, port)
        chroma.process, chroma.log = restarted.process, restarted.log
    assert citations(ask(lorag_server, "strict")), "retrieval works again once Chroma is back"
    assert lorag_server.process.poll() is None


def _start_on(path: Path, port: int) -> ChromaServer:
    """`chroma run` again on the same data and port (the lorag server's config names that port)."""
    import tests.knowledge_helpers as helpers

    original = helpers.free_port
    helpers.free_port = lambda: port  # type: ignore[assignment]
    try:
        return ChromaServer(path)
    finally:
        helpers.free_port = original

