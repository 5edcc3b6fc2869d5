"""`lorag kb ...` through click: every command, --json shapes, readable errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorag.cli import cli
from lorag.errors import LoragError
from tests.knowledge_helpers import write_corpus

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def logs_to_stderr() -> None:
    """As `lorag` itself does (lorag.cli.main): events on stderr, stdout for results."""
    from lorag.logging import configure_logging

    configure_logging()


def run(*args: str) -> tuple[int, str, str, BaseException | None]:
    result = CliRunner().invoke(cli, ["kb", *args], catch_exceptions=True)
    return result.exit_code, result.stdout, result.stderr, result.exception


def test_kb_commands_end_to_end(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    state = ["--state-dir", str(tmp_path / "state")]

    code, out, _, _ = run("create", "handbook", "--description", "test docs", *state)
    assert code == 0 and "created knowledge base 'handbook'" in out

    code, out, err, _ = run("ingest", "handbook", str(corpus), *state)
    assert code == 0, err
    assert "8 added, 0 updated, 0 unchanged, 0 removed" in out and "ingesting into handbook" in err

    code, out, _, _ = run("ingest", "handbook", str(corpus), "--json", *state)
    report = json.loads(out)
    assert code == 0 and len(report["unchanged"]) == 8 and report["chunks_written"] == 0

    code, out, _, _ = run("list", "--json", *state)
    (base,) = json.loads(out)["knowledge_bases"]
    assert base["name"] == "handbook" and base["documents"] == 8 and base["chunks"] >= 8

    code, out, _, _ = run("show", "handbook", *state)
    assert code == 0 and "documents        8" in out and "all-MiniLM-L6-v2 (384 dims)" in out
    assert str(corpus / "manual.pdf") in out
    shown = json.loads(run("show", "handbook", "--json", *state)[1])
    assert shown["chunks"] == base["chunks"] and shown["bytes"] > 0

    code, out, _, _ = run("query", "handbook", "exoplanet transit photometry", "--json", "-k", "3", *state)
    hits = json.loads(out)["hits"]
    assert code == 0 and len(hits) == 3
    assert set(hits[0]) >= {"source", "text", "score", "metadata"}
    assert hits[0]["source"].endswith("manual.pdf") and hits[0]["metadata"]["page"] == 2
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    code, out, _, _ = run("query", "handbook", "sourdough starter", "--mode", "keyword", *state)
    assert code == 0 and out.startswith(" 1. ") and "guide.md (Sourdough Guide > Starter)" in out

    code, out, _, _ = run("query", "handbook", "telescope", "--filter", "page=1", "--json", *state)
    assert {h["metadata"]["page"] for h in json.loads(out)["hits"]} == {1}
    code, out, _, _ = run("query", "handbook", "telescope", "--where", '{"file_type": "pdf"}', "--json", *state)
    assert {h["metadata"]["file_type"] for h in json.loads(out)["hits"]} == {"pdf"}

    code, out, _, _ = run("remove", "handbook", str(corpus / "notes.txt"), *state)
    assert code == 0 and "removed 1 document(s)" in out
    (corpus / "guide.md").unlink()
    code, out, _, _ = run("ingest", "handbook", str(corpus), "--sync", "--json", *state)
    assert [Path(s).name for s in json.loads(out)["removed"]] == ["guide.md"]

    code, _, _, exc = run("drop", "handbook", *state)
    assert code != 0 and isinstance(exc, LoragError) and "--yes" in str(exc)
    code, out, _, _ = run("drop", "handbook", "--yes", *state)
    assert code == 0 and "dropped" in out
    code, out, _, _ = run("list", *state)
    assert "no knowledge bases" in out


def test_kb_errors_are_lorag_errors(tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    code, _, _, exc = run("ingest", "nope", str(tmp_path / "missing"), *state)
    assert code != 0 and isinstance(exc, LoragError) and "no such file or directory" in str(exc)
    code, _, _, exc = run("query", "nope", "hello", *state)
    assert isinstance(exc, LoragError) and "no knowledge base named 'nope'" in str(exc)
    code, _, _, exc = run("create", "x", *state)
    assert isinstance(exc, LoragError) and "invalid knowledge base name" in str(exc)
    code, _, _, exc = run("query", "nope", "hello", "--where", "{bad", *state)
    assert isinstance(exc, LoragError) and "--where is not valid JSON" in str(exc)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "junk.txt").write_bytes(b"\x00\x01\x02" * 100)
    (bad / "ok.md").write_text("# Ok\n\nA fine document about kites.", encoding="utf-8")
    code, out, err, exc = run("ingest", "kites", str(bad), "--create", *state)
    assert code != 0 and isinstance(exc, LoragError) and "1 file(s) could not be ingested" in str(exc)
    assert "1 added" in out and f"skipped {bad / 'junk.txt'}: binary data" in err
