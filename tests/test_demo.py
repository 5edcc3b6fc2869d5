"""`lorag demo --tiny`: its bundled data, its set-up (real training, real ingestion) and, end to end, its samples.

The real-model demo is exercised by tests/test_real_model.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorag.config import load_settings
from lorag.demo.samples import trained_answers, triage_schema
from lorag.demo.setup import DATA, TINY, TRAINED
from tests.conftest import free_port

ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("LORAG_")}, "TOKENIZERS_PARALLELISM": "false"}


def lorag_demo(state: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorag.cli", "demo", "--tiny", "--state-dir", str(state), *args],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


def tree(root: Path) -> dict[str, int]:
    """Every file under root with its mtime: what a reusing run must leave alone."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Setup:
    state: Path
    output: str
    seconds: float


@pytest.fixture(scope="module")
def first_setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """One real set-up (model, two trainings, two ingestions) shared by this module's tests."""
    state = tmp_path_factory.mktemp("demo") / "state"
    started = time.monotonic()
    result = lorag_demo(state, "--setup-only", "--port", str(free_port()))
    assert result.returncode == 0, result.stderr[-3000:]
    return Setup(state, result.stdout, time.monotonic() - started)


# -- the bundled data ---------------------------------------------------------------


def test_bundled_data_is_consistent() -> None:
    """Training files, domain profiles and the eval set agree with each other."""
    profiles = tomllib.loads((TINY.data / "domains.toml").read_text())["domains"]
    assert {"legal", "medical", "triage", "general"} <= set(profiles)
    knowledge_text = {d.name: " ".join(p.read_text() for p in (DATA / d.docs).iterdir()) for d in TRAINED}
    for domain in TRAINED:
        assert profiles[domain.name]["adapter"] == domain.adapter
        assert profiles[domain.name]["knowledge"]["bases"] == [domain.kb]
        lines = [json.loads(line) for line in (TINY.data / domain.train_file).read_text().splitlines()]
        assert 20 <= len(lines) <= 40
        system = profiles[domain.name].get("system_prompt")
        for line in lines:  # trained with exactly the prompt the domain serves
            roles = [m["role"] for m in line["messages"]]
            assert roles == (["system"] if system else []) + ["user", "assistant"]
            if system:
                assert line["messages"][0]["content"] == system
    assert "14 days" in knowledge_text["legal"] and "14 days" not in (TINY.data / "legal/train.jsonl").read_text()
    assert "4 g" in knowledge_text["medical"] and "4 g" not in (TINY.data / "medical/train.jsonl").read_text()

    eval_items = [json.loads(line) for line in (TINY.data / "eval.jsonl").read_text().splitlines()]
    assert len({item["id"] for item in eval_items}) == len(eval_items)
    kinds = {"adapter": 0, "knowledge": 0}
    for item in eval_items:
        assert item["domain"] in profiles
        if item.get("sources"):
            kinds["knowledge"] += 1
            for source in item["sources"]:
                assert (DATA / item["domain"] / "knowledge" / source).is_file(), source
        elif "schema" in item:
            assert item["schema"] == triage_schema()
        else:
            kinds["adapter"] += 1
            assert trained_answers(item["domain"])[item["question"]] == item["answer"]
    assert kinds["adapter"] >= 6 and kinds["knowledge"] >= 6


def test_real_training_data_is_served_with_the_prompt_it_was_trained_on() -> None:
    """The real demo's adapters learn the domain's prompt: its system prompt, with retrieved context or without."""
    profiles = tomllib.loads((DATA / "domains.toml").read_text())["domains"]
    for domain in TRAINED:
        system = profiles[domain.name]["system_prompt"]
        lines = [json.loads(line) for line in (DATA / domain.train_file).read_text().splitlines()]
        with_context = 0
        for line in lines:
            assert [m["role"] for m in line["messages"]] == ["system", "user", "assistant"]
            content = line["messages"][0]["content"]
            assert content == system or content.startswith(system + "\n\nContext:\n[1] ("), content
            with_context += content != system
        assert 30 <= len(lines) <= 60 and with_context >= 8


def test_eval_set_loads_with_lorag_eval_reader() -> None:
    dataset = pytest.importorskip("lorag.evaluation.dataset")
    items = dataset.load_eval_set(TINY.data / "eval.jsonl")
    assert len(items) >= 12 and all(item.domain for item in items)


def test_demo_data_ships_in_the_wheel() -> None:
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert "demo/data/**/*" in pyproject["tool"]["setuptools"]["package-data"]["lorag"]


# -- set-up -------------------------------------------------------------------------


@pytest.mark.slow
def test_setup_trains_registers_ingests_and_writes_a_config_that_loads(first_setup: Setup) -> None:
    from lorag.adapters.registry import AdapterRegistry
    from lorag.adapters.service import AdapterService
    from lorag.knowledge.service import KnowledgeService

    state = first_setup.state
    settings = load_settings(state / "lorag.toml")
    assert settings.state_path == state.resolve()
    assert set(settings.domains) == {"legal", "medical", "triage", "general"}
    assert settings.routing.fallback == "general"
    assert settings.domains["medical"].plugins is not None and settings.domains["medical"].plugins.enabled == ["pii"]

    registry = AdapterRegistry(settings.state_path)
    service = AdapterService(settings, registry)
    for domain in TRAINED:
        entry = registry.resolve(domain.adapter)
        assert re.fullmatch(r"d[0-9a-f]{8}", entry.version)
        # trained by `lorag adapters train` into the state dir, then copied into the registry
        assert Path(entry.source).is_relative_to(state.resolve() / "training" / domain.adapter)
        service.validate(domain.adapter, Path(entry.path), None, trusted=True)  # raises if invalid
        result = json.loads((Path(entry.source).parent / "result.json").read_text())
        assert result["train_loss"] < 2.0, result
        assert f"registered {entry.ref}" in first_setup.output

    knowledge = KnowledgeService.from_settings(settings)
    try:
        for domain in TRAINED:
            summary = knowledge.summary(domain.kb)
            documents = len(list((DATA / domain.docs).iterdir()))
            assert summary["documents"] == documents and summary["chunks"] >= documents, summary
    finally:
        knowledge.close()


@pytest.mark.slow
def test_second_setup_reuses_everything(first_setup: Setup) -> None:
    state = first_setup.state
    before = tree(state / "training"), tree(state / "models"), tree(state / "adapters"), tree(state / "demo")
    started = time.monotonic()
    again = lorag_demo(state, "--setup-only", "--port", str(load_settings(state / "lorag.toml").server.port))
    seconds = time.monotonic() - started
    assert again.returncode == 0, again.stderr[-3000:]
    after = tree(state / "training"), tree(state / "models"), tree(state / "adapters"), tree(state / "demo")
    assert after == before  # no training run, no new adapter version, no rebuilt model or copied data
    reused = [line.split()[0:2] for line in again.stdout.splitlines() if line.startswith("  ") and " reused " in line]
    assert reused == [["base", "model"], ["config", "reused"], ["adapter", "reused"], ["adapter", "reused"]], again.stdout
    assert again.stdout.count("(unchanged)") == 2, again.stdout
    assert seconds < first_setup.seconds, (seconds, first_setup.seconds)  # nothing trained, nothing built


# -- end to end ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.engine
def test_demo_serves_and_prints_every_sample(first_setup: Setup) -> None:
    """The whole demo on the set-up state (reused): a real server, real requests, every section printed."""
    result = lorag_demo(first_setup.state, "--port", str(free_port()), "--exit-after-samples")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    out = result.stdout
    sections = ["1. Base model vs domain adapter", "2. Retrieval with citations", "3. PII redaction",
                "4. A JSON-schema domain", '5. model: "auto"', "Talk to it"]
    positions = [out.find(section) for section in sections]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), out
    part = dict(zip(sections, out.split("\n== ")[1:], strict=False))

    adapters = part[sections[0]]
    rows = [line for line in adapters.splitlines() if line.startswith("    ")]
    assert sum("✓ " in r for r in rows) == 3 and sum("✗ " in r for r in rows) == 3, adapters  # adapter = trained
    assert "legal-lora        ✓ An offer, its acceptance" in adapters
    citations = part[sections[1]]
    assert "[1] legal-kb      deposits.md > Getting it back" in citations
    assert "[1] medical-kb    paracetamol.md" in citations
    pii = part[sections[2]]
    assert "Done. We will reach you at [EMAIL_1] or [PHONE_1]." in pii
    assert "ana.ruiz@clinic.example" in pii and "Write to Dr. Ana Ruiz at [EMAIL_1] or call [PHONE_1]." in pii
    assert "jane.doe@example.com" not in pii.split("Q: Please update")[1].split("\n", 1)[1]
    assert "valid JSON, matches the schema" in part[sections[3]]
    routed = part[sections[4]]
    for question, domain in (("faded", "legal"), ("paracetamol", "medical"), ("invoice", "triage"),
                             ("Mona Lisa", "general")):
        line = next(line for line in routed.splitlines() if question in line)
        assert f"-> {domain}" in line, line
    assert "tiny" in out and "`lorag demo` without --tiny imports SmolLM2-135M-Instruct" in out


def test_ctrl_c_during_the_samples_stops_cleanly(first_setup: Setup) -> None:
    """Ctrl-C while the samples print stops the server under them: that is the user's stop, not a
    failure of the samples. Started as a shell starts a background job (SIGINT ignored until the
    server takes it), where it used to end in "Error: the samples failed: Connection refused"."""
    demo = subprocess.Popen([sys.executable, "-m", "lorag.cli", "demo", "--tiny", "--state-dir", str(first_setup.state),
                             "--port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, preexec_fn=ignore_sigint)
    try:
        assert demo.stdout is not None
        seen = ""
        for line in demo.stdout:
            seen += line
            if line.startswith("== 1."):
                break  # the samples have begun
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=300)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert "== 1." in seen, seen + err[-2000:]
    assert demo.returncode == 0, (out, err[-2000:])
    assert "samples failed" not in out + err and "Traceback" not in err, (out, err[-2000:])


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_the_loop_round_holds_out_half_of_each_subset_and_reports_it(tmp_path: Path) -> None:
    """`lorag demo loop`'s split and report (its server round is the promotion and training-data tests' flow)."""
    import json as json_

    from lorag.demo.loop import held_out_lines, loop_items, report
    from lorag.improve.promotion import read_cases

    traffic, held = loop_items()
    assert {i["id"] for i in traffic}.isdisjoint({i["id"] for i in held}) and len(traffic) == len(held) == 15
    assert loop_items() == (traffic, held)  # seeded
    for subset in ("knowledge", "style", "mixed"):
        assert sum(i["subset"] == subset for i in held) == 5
    path = tmp_path / "held.jsonl"
    path.write_text(held_out_lines(held))
    cases = read_cases(path, limit=100)
    assert [c.fields["question"] for c in cases] == [i["question"] for i in held]
    assert all(json_.loads(line)["provenance"]["metadata"]["subset"] for line in path.read_text().splitlines())
    lines: list[str] = []
    verdict = {"graders": ["fact", "format"], "scores": {"candidate": [1.0] * 15, "previous": [0.5] * 15},
               "promoted": True, "adapter": "legal-lora", "candidate": "ftjob-x", "previous": "v1", "reason": "ok"}
    report(verdict, held, lines.append)
    table = "\n".join(lines)
    assert "knowledge      5    0.500    1.000   +0.500 ± 0.000" in table and "all           15" in table
    assert "lorag adapters activate legal-lora v1" in table
