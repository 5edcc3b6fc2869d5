"""lorag knowledge bases as llama-index citizens: lorag's retrieval as a llama-index retriever
(in-process and through a served app), llama-index Documents, nodes and readers into lorag,
and a llama-index ChromaVectorStore collection imported without re-embedding."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorag.knowledge.embeddings import Embedder
from lorag.knowledge.errors import KnowledgeBaseExists
from lorag.knowledge.llama_embedding import LoragEmbedding
from lorag.knowledge.llama_import import EmbeddingCheckFailed, import_collection
from lorag.knowledge.llama_remote import RemoteKnowledgeError
from lorag.knowledge.llama_retriever import LoragRetriever
from lorag.knowledge.service import KnowledgeService
from tests.echo_server import USER_KEY, EchoServer, echo_server, echo_settings
from tests.knowledge_helpers import assert_consistent, free_port, write_corpus, write_large_corpus

pytestmark = pytest.mark.timeout(600)
KB = "docs"
NO_KNOWLEDGE_KEY = "sk-no-knowledge-key"
SICILY = "Which volcano is on the island of Sicily?"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    from lorag.knowledge.embeddings import get_embedder
    from lorag.knowledge.settings import EmbeddingSettings

    return get_embedder(EmbeddingSettings())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[tuple[EchoServer, KnowledgeService]]:
    """The real app over HTTP (echo engine), its knowledge service holding the test corpus as `docs`."""
    tmp = tmp_path_factory.mktemp("served")
    corpus = write_corpus(tmp / "corpus")
    keys = [{"key": USER_KEY, "name": "app"}, {"key": NO_KNOWLEDGE_KEY, "name": "chat-only", "knowledge": False}]
    with echo_server(echo_settings(tmp, server={"api_keys": keys})) as server:
        service: KnowledgeService = server.app.state.knowledge.get()
        service.create(KB)
        report = service.ingest_paths(KB, [str(corpus)])
        assert not report.failed, report.skipped
        yield server, service


def _citation(node: Any) -> dict[str, Any]:
    return {key: node.metadata.get(key) for key in ("kb", "source", "location", "chunk_id", "title", "page")}


# ---------------------------------------------------------------------------- lorag as a retriever


def test_query_engine_over_lorag_cites_like_lorag_locally_and_remotely(served: tuple[EchoServer, KnowledgeService]) -> None:
    """RetrieverQueryEngine + MockLLM over a lorag base, in-process and through the served app:
    source_nodes are lorag's hits (chunk ids, scores, citations), the same both ways."""
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine

    server, service = served
    direct = service.query(KB, SICILY, top_k=3, mode="hybrid")
    local = LoragRetriever.local(service, KB, top_k=3, mode="hybrid")
    remote = LoragRetriever.remote(server.url, USER_KEY, KB, top_k=3, mode="hybrid")
    answers = {}
    for name, retriever in (("local", local), ("remote", remote)):
        response = RetrieverQueryEngine.from_args(retriever, llm=MockLLM()).query(SICILY)
        nodes = response.source_nodes
        assert [n.node.node_id for n in nodes] == [h.chunk_id for h in direct], name
        assert [n.score for n in nodes] == pytest.approx([h.score for h in direct]), name
        top = nodes[0].node
        assert Path(top.metadata["source"]).name == "notes.txt" and top.metadata["kb"] == KB
        assert "Etna" in top.get_content() and top.metadata["chunk_id"] == top.node_id
        answers[name] = [_citation(n.node) for n in nodes]
    assert answers["local"] == answers["remote"]
    remote.close()

    # lorag's options pass through: a PDF hit cites its page, a filter keeps one file type.
    pdf = LoragRetriever.remote(server.url, USER_KEY, [KB], top_k=1, mode="vector").retrieve("exoplanet transit photometry")
    assert pdf[0].node.metadata["page"] == 2 and pdf[0].node.metadata["location"] == "page 2"
    markdown = LoragRetriever.local(service, KB, mode="keyword", filters={"file_type": "markdown"}).retrieve("sourdough")
    assert markdown and {Path(n.node.metadata["source"]).name for n in markdown} == {"guide.md"}


def test_aretrieve_matches_retrieve(served: tuple[EchoServer, KnowledgeService]) -> None:
    server, service = served
    for retriever in (LoragRetriever.local(service, KB, top_k=4), LoragRetriever.remote(server.url, USER_KEY, KB, top_k=4)):
        sync = [n.node.node_id for n in retriever.retrieve("honeybee waggle dance")]
        both = asyncio.run(retriever.aretrieve("honeybee waggle dance"))
        assert [n.node.node_id for n in both] == sync and Path(both[0].node.metadata["source"]).name == "bees.html"


def test_fusion_retriever_and_chat_engine_over_lorag(served: tuple[EchoServer, KnowledgeService]) -> None:
    from llama_index.core.chat_engine import CondensePlusContextChatEngine
    from llama_index.core.llms import MockLLM
    from llama_index.core.retrievers import QueryFusionRetriever

    _, service = served
    fusion = QueryFusionRetriever(
        [LoragRetriever.local(service, KB, mode="vector", top_k=3), LoragRetriever.local(service, KB, mode="keyword", top_k=3)],
        llm=MockLLM(), num_queries=1, mode="reciprocal_rerank", similarity_top_k=3, use_async=False,
    )
    fused = fusion.retrieve("chess olympiad in Budapest")
    assert Path(fused[0].node.metadata["source"]).name == "events.jsonl"

    chat = CondensePlusContextChatEngine.from_defaults(LoragRetriever.local(service, KB, top_k=2), llm=MockLLM())
    chat.chat("how can I reset my password")
    second = chat.chat("and where are invoices sent?")  # condensed with the history by the (mock) LLM
    assert second.source_nodes and all(n.node.metadata["kb"] == KB for n in second.source_nodes)


def test_server_refusals_are_one_readable_exception(served: tuple[EchoServer, KnowledgeService]) -> None:
    server, _ = served
    cases = [
        (LoragRetriever.remote(server.url, USER_KEY, "no-such-base"), "404", "no knowledge base named 'no-such-base'"),
        (LoragRetriever.remote(server.url, NO_KNOWLEDGE_KEY, KB), "403", "may not query knowledge bases"),
        (LoragRetriever.remote(server.url, "sk-wrong-key-123", KB), "401", "401"),
        (LoragRetriever.remote(server.url, USER_KEY, KB, mode="fuzzy"), "mode", "mode"),
        (LoragRetriever.remote(f"http://127.0.0.1:{free_port()}", USER_KEY, KB, timeout_s=5), "cannot reach", ""),
    ]
    for retriever, first, second in cases:
        with pytest.raises(RemoteKnowledgeError) as caught:
            retriever.retrieve("anything")
        message = str(caught.value)
        assert first in message and second in message and "\n" not in message, message
    with pytest.raises(RemoteKnowledgeError, match="404"):
        asyncio.run(cases[0][0].aretrieve("anything"))


# ---------------------------------------------------------------------------- llama-index into lorag


def test_ingest_documents_and_nodes(served: tuple[EchoServer, KnowledgeService]) -> None:
    """Documents sharing a source become one lorag document (a page each); a node that fits the
    chunk size stays one chunk; ingesting the same items again writes nothing."""
    from llama_index.core.schema import Document, NodeRelationship, RelatedNodeInfo, TextNode

    from lorag.knowledge.llama_documents import ingest_documents

    _, service = served
    pages = [
        Document(text="The lighthouse keeper logs the fog horn every night.", metadata={"file_path": "/virtual/keeper.pdf", "page_label": "1", "file_name": "keeper.pdf"}),
        Document(text="Lamp oil is delivered by boat on the first Monday of the month.", metadata={"file_path": "/virtual/keeper.pdf", "page_label": "2", "file_name": "keeper.pdf"}),
    ]
    node = TextNode(
        id_="node-1", text="Tide tables for the northern harbour are printed every spring.",
        metadata={"section": "Harbour > Tides", "title": "Harbour notes"},
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id="harbour-doc")},
    )
    report = ingest_documents(service, "llama-docs", [*pages, node], create=True)
    assert sorted(report.added) == ["/virtual/keeper.pdf", "llama-index:harbour-doc"] and report.chunks_written == 3
    hit = service.query("llama-docs", "when does the lamp oil arrive", top_k=1)[0]
    assert hit.source == "/virtual/keeper.pdf" and hit.location == "page 2" and hit.metadata["title"] == "keeper.pdf"
    tide = service.query("llama-docs", "tide tables", top_k=1, mode="keyword")[0]
    assert tide.text == node.text and tide.location == "Harbour > Tides" and tide.metadata["title"] == "Harbour notes"
    again = ingest_documents(service, "llama-docs", [*pages, node])
    assert not again.added and sorted(again.unchanged) == sorted(report.added) and again.chunks_written == 0
    assert_consistent(service, "llama-docs")


def test_llama_index_reader_through_the_hook(served: tuple[EchoServer, KnowledgeService], tmp_path: Path) -> None:
    """llama-index's own JSONReader, registered for `.ljson` by a plugin, reads files at ingestion."""
    from llama_index.core.readers.json import JSONReader

    from lorag.plugins import manager
    from lorag.plugins.hookspecs import hookimpl

    class LlamaJsonPlugin:
        @hookimpl
        def register_knowledge_readers(self, register: Any) -> None:
            register(".ljson", lambda: JSONReader(levels_back=0))

    _, service = served
    record = manager.add_plugin(manager.process_plugins(), "llama-json", LlamaJsonPlugin())
    try:
        assert record.ok, record.error
        path = tmp_path / "fleet.ljson"
        path.write_text('{"ships": [{"name": "Aurora", "cargo": "frozen cod from Tromso"}]}', encoding="utf-8")
        report = service.ingest_paths("readers", [str(path)], create=True)
        assert report.added == [str(path)] and not report.skipped
        hit = service.query("readers", "frozen cod cargo", top_k=1)[0]
        assert hit.source == str(path) and "Aurora" in hit.text and hit.metadata["file_type"] == ".ljson"
    finally:
        manager.forget_process_plugins()


# ---------------------------------------------------------------------------- import a llama-index Chroma collection


def _llama_collection(path: Path, name: str, corpus: Path, embed_model: Any) -> tuple[Any, Any]:
    """What a user's llama-index app builds: SimpleDirectoryReader -> VectorStoreIndex over ChromaVectorStore."""
    import chromadb
    from llama_index.core import SimpleDirectoryReader, StorageContext, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.vector_stores.chroma import ChromaVectorStore

    client = chromadb.PersistentClient(path=str(path))
    collection = client.get_or_create_collection(name)
    documents = SimpleDirectoryReader(str(corpus), required_exts=[".txt", ".md"]).load_data()
    index = VectorStoreIndex.from_documents(
        documents,
        storage_context=StorageContext.from_defaults(vector_store=ChromaVectorStore(chroma_collection=collection)),
        embed_model=embed_model,
        transformations=[SentenceSplitter(chunk_size=96, chunk_overlap=8)],
    )
    return collection, index


class _Reversed(LoragEmbedding):
    """Same dimension, other vectors: what a different model of the same size looks like."""

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return [vector[::-1] for vector in super()._get_text_embeddings(texts)]


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> dict[str, Any]:
    from llama_index.core.embeddings import MockEmbedding

    tmp = tmp_path_factory.mktemp("llama")
    corpus = write_large_corpus(tmp / "corpus", documents=12, big_paragraphs=8)
    path = tmp / "chroma"
    good, index = _llama_collection(path, "handbook", corpus, LoragEmbedding(embedder=embedder))
    _llama_collection(path, "other-dim", corpus, MockEmbedding(embed_dim=8))
    _llama_collection(path, "other-model", corpus, _Reversed(embedder=embedder))
    return {"path": path, "good": good, "index": index}


QUERIES = ["copper violin orbit", "step 3 of the procedure", "Document 7 sentence 2", "glacier quartz falcon harbor"]


def test_imported_collection_answers_like_llama_index(served: tuple[EchoServer, KnowledgeService], llama_store: dict[str, Any]) -> None:
    _, service = served
    report = import_collection(service, "imported", llama_store["good"])
    assert len(report.added) == 13 and report.chunks_written == llama_store["good"].count()
    assert_consistent(service, "imported")
    llama = llama_store["index"].as_retriever(similarity_top_k=10)
    ours = LoragRetriever.local(service, "imported", top_k=10, mode="vector")
    for query in QUERIES:
        expected = [n.node.node_id for n in llama.retrieve(query)]
        got = ours.retrieve(query)
        assert [n.node.metadata["llama_node_id"] for n in got] == expected, query
        assert all(n.node.metadata["source"].endswith((".txt", ".md")) for n in got)
    # The keyword index holds the imported chunks too.
    keyword = service.query("imported", "handbook procedure", top_k=3, mode="keyword")
    assert keyword and Path(keyword[0].source).name == "handbook.md"
    with pytest.raises(KnowledgeBaseExists):
        import_collection(service, "imported", llama_store["good"])


def test_import_refuses_other_embeddings_and_leaves_nothing(
    served: tuple[EchoServer, KnowledgeService], llama_store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import chromadb

    _, service = served
    client = chromadb.PersistentClient(path=str(llama_store["path"]))
    with pytest.raises(EmbeddingCheckFailed, match="8-dimensional vectors") as caught:
        import_collection(service, "from-mock", client.get_collection("other-dim"))
    assert "\n" not in str(caught.value) and not service.exists("from-mock")
    with pytest.raises(EmbeddingCheckFailed, match=r"cosine -?0\.\d+ \(< 0.99\)"):
        import_collection(service, "from-other", client.get_collection("other-model"))
    assert not service.exists("from-other")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr("lorag.knowledge.llama_import.write_incoming", broken)
    with pytest.raises(OSError):
        import_collection(service, "half", llama_store["good"])
    assert not service.exists("half")


def test_import_command_prints_one_line(llama_store: dict[str, Any], tmp_path: Path) -> None:
    """`lorag kb import-llama-index`: a refused collection is one line on stderr, exit 1, no base."""
    config = tmp_path / "lorag.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n', encoding="utf-8")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lorag.cli", "kb", *args, "--config", str(config)],
            capture_output=True, text=True, timeout=300, env={**os.environ, "LORAG_LOG_LEVEL": "error"},
        )

    refused = run("import-llama-index", "mixed", "--collection", "other-model", "--chroma-path", str(llama_store["path"]))
    assert refused.returncode == 1, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Chroma collection 'other-model' was not embedded with"), refused.stderr
    missing = run("import-llama-index", "mixed", "--collection", "nope", "--chroma-path", str(llama_store["path"]))
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [missing.stderr.strip()]
    assert "no collection 'nope'" in missing.stderr
    listed = run("list")
    assert listed.returncode == 0 and "mixed" not in listed.stdout


def test_retriever_from_config_owns_its_service(tmp_path: Path, embedder: Embedder) -> None:
    """A retriever over a state directory opens (and on close releases) its own service."""
    from llama_index.core.schema import Document

    from lorag.knowledge.llama_documents import ingest_documents

    config = tmp_path / "lorag.toml"
    config.write_text("", encoding="utf-8")
    with LoragRetriever.from_config("notes", config, state_dir=tmp_path / "state", top_k=1) as retriever:
        service = retriever.backend.service  # type: ignore[attr-defined]
        ingest_documents(service, "notes", [Document(text="The ferry to Capri leaves at nine.", id_="ferry")], create=True)
        node = retriever.retrieve("when does the ferry leave")[0].node
        assert node.metadata["source"] == "llama-index:ferry" and "Capri" in node.get_content()
    assert service.closed


def test_a_query_engine_over_a_running_lorag_serve(server: Any, admin: Any) -> None:
    """The same retriever against a real `lorag serve` process (the session's, its real engine): a base
    made and filled over HTTP, then queried by llama-index's RetrieverQueryEngine with a mock LLM."""
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine

    from lorag.knowledge.llama_retriever import LoragRetriever
    from tests.conftest import USER_KEY

    note = ("kites.md", b"# Kites\n\nA kite flies best in a steady wind of 15 to 25 km/h.\n", "text/markdown")
    made = admin.post("/v1/knowledge/serve-kites/documents", files=[("files", note)], data={"create": "true"})
    assert made.status_code in (200, 201), made.text
    try:
        with LoragRetriever.remote(server.url, USER_KEY, "serve-kites", top_k=2) as retriever:
            engine = RetrieverQueryEngine.from_args(retriever, llm=MockLLM())
            answer = engine.query("What wind does a kite need?")
        [hit] = answer.source_nodes
        assert hit.node.metadata["kb"] == "serve-kites" and hit.node.metadata["source"] == "upload:kites.md"
        assert "steady wind" in hit.node.get_content()
    finally:
        admin.delete("/v1/knowledge/serve-kites")
