"""register_knowledge_readers through real ingestion: the example plugin teaches lorag `.statute` files."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorag.config import load_settings
from lorag.knowledge.service import KnowledgeService
from lorag.plugins import manager
from lorag.plugins.manager import LOAD_ENV
from tests.plugins.host import install_example_plugin

STATUTE = """Civil Procedure Code
§ 1 Scope. This code governs civil actions in the courts of the state.
§ 2 Limitation. An action on a written contract must be brought within four years of the breach.
§ 3 Service. A summons is served by personal delivery to the defendant.
"""


def test_plugin_reader_is_used_by_ingestion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_example_plugin(tmp_path / "site")
    monkeypatch.delenv(LOAD_ENV, raising=False)
    manager.forget_process_plugins()  # load again, now with the example installed
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ccp.statute").write_text(STATUTE, encoding="utf-8")
    (corpus / "notes.txt").write_text("Tenants give thirty days written notice.", encoding="utf-8")
    config = tmp_path / "empty.toml"
    config.write_text("")
    service = KnowledgeService.from_settings(load_settings(config, {"state_dir": str(tmp_path / "state")}))
    try:
        service.create("law")
        report = service.ingest_paths("law", [str(corpus)])
        assert not report.skipped, report.skipped
        hits = service.query("law", "how long to sue on a written contract", top_k=1, mode="hybrid")
        assert Path(hits[0].source).name == "ccp.statute"
        assert "four years" in hits[0].text and "§ 2" in hits[0].location
    finally:
        service.close()
    manager.forget_process_plugins()
    monkeypatch.setenv(LOAD_ENV, "")  # plugins off: the extension is unknown again
    from lorag.knowledge.readers import file_type_of

    assert file_type_of("x.statute") is None
    manager.forget_process_plugins()
