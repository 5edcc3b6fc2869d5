"""lorag replicas sharing state: what one replica writes, every other one serves.

Real lorag apps over real HTTP (the echo engine: nothing here needs generation), sharing a real
`chroma run` server. Limits shared through Redis are in tests/test_shared_limits.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest

from tests.echo_server import ADMIN_KEY, echo_server, echo_settings
from tests.knowledge_helpers import ChromaServer

pytestmark = pytest.mark.timeout(600)
MODES = ("vector", "keyword", "hybrid")


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> ChromaServer:
    return ChromaServer.shared(tmp_path_factory.mktemp("chroma"))


def sources(http: httpx.Client, kb: str, question: str, mode: str) -> list[str]:
    answer = http.post(f"/v1/knowledge/{kb}/query", json={"query": question, "mode": mode, "top_k": 3})
    answer.raise_for_status()
    return [hit["source"] for hit in answer.json()["hits"]]


def upload(http: httpx.Client, kb: str, name: str, text: str) -> None:
    http.post(f"/v1/knowledge/{kb}/documents", files=[("files", (name, text.encode(), "text/markdown"))],
              data={"create": "true"}).raise_for_status()


def test_a_document_ingested_through_one_replica_is_found_through_another_in_every_mode(
        tmp_path: Path, chroma_server: ChromaServer) -> None:
    knowledge = {"chroma": {"mode": "http", "host": "127.0.0.1", "port": chroma_server.port}}
    kb = "replicated-notes"
    with contextlib.ExitStack() as stack:
        a, b = (stack.enter_context(echo_server(echo_settings(tmp_path / name, knowledge=knowledge)))
                for name in ("a", "b"))
        http_a, http_b = (stack.enter_context(httpx.Client(base_url=replica.url, timeout=300,
                                                           headers={"authorization": f"Bearer {ADMIN_KEY}"}))
                          for replica in (a, b))
        upload(http_a, kb, "volcanoes.md", "# Volcanoes\n\nEtna on Sicily is the most active volcano in Europe.\n")
        for mode in MODES:  # B had no reason to look at the base before: its first query reads it
            assert sources(http_b, kb, "Etna volcano Sicily", mode)[:1] == ["upload:volcanoes.md"], mode
        upload(http_b, kb, "bread.md", "# Bread\n\nA sourdough starter is flour and water, fed daily.\n")
        for mode in MODES:  # A's cached BM25 and vector indexes follow the base's revision at once
            assert sources(http_a, kb, "sourdough starter flour", mode)[:1] == ["upload:bread.md"], mode
        http_b.delete(f"/v1/knowledge/{kb}/documents", params={"source": "upload:volcanoes.md"}).raise_for_status()
        for mode in MODES:
            assert "upload:volcanoes.md" not in sources(http_a, kb, "Etna volcano Sicily", mode), mode
        http_a.delete(f"/v1/knowledge/{kb}").raise_for_status()
