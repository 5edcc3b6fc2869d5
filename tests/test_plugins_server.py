"""Plugins through the real server, the real engine and the official openai client.

One `lorag serve` process with a plugin configuration: each adapter name below is
a domain with its own plugins. The tiny model has random weights, so the tests
that need particular words in the output force them with a structured-output
regex (tests/plugins/forced.py): the text is still generated token by token by
vLLM and streamed through lorag's filters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from lorag.plugins.manager import LOAD_ENV
from tests.background import Background
from tests.conftest import ADMIN_KEY, USER_KEY, Models, Server, start_server
from tests.devserver import wait_for
from tests.plugins.host import HERE, ROOT, install_example_plugin

pytestmark = pytest.mark.engine

PII_TEXT = ("Write to jane.doe@example.com or call +44 20 7946 0958 today; pay with card "
            "4111 1111 1111 1111 and never share the key AKIAIOSFODNN7EXAMPLE with anyone.")
PII_VALUES = ["jane.doe@example.com", "+44 20 7946 0958", "4111 1111 1111 1111", "AKIAIOSFODNN7EXAMPLE"]
PII_REDACTED = ("Write to [EMAIL_1] or call [PHONE_1] today; pay with card [CARD_1] and never share the key "
                "[SECRET_1] with anyone.")
BLOCKED_TEXT = "Here is the plan in some detail: the work on Project Falcon starts next week, quietly."
BLOCK_MESSAGE = "Blocked: this topic is confidential."
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "What does the contract say about notice?"}]

# domain (an adapter name clients ask for) -> the adapter it serves
DOMAINS = {"pii": "alpha", "restore": "beta", "blocked": "gamma", "legal": "delta", "crashy": "swap1",
           "broken": "swap2", "slow": "alpha", "strict": "beta", "gated": "gamma"}


def plugin_config(models: Models, gate: Path) -> str:
    preload = "".join(f'[adapters.preload.{name}]\npath = "{models.adapters[adapter]}"\n'
                      for name, adapter in DOMAINS.items())
    modules = ", ".join(f'{name} = "{HERE / (name + ".py")}"'
                        for name in ("forced", "crashing", "slow", "retry_once", "file_gate"))
    return f"""
{preload}
[plugins]
default = ["json_schema", "formatting"]
hook_timeout_s = 1.0
max_retries = 2
modules = {{ {modules}, broken = "{HERE / 'broken_import.py'}" }}

[plugins.settings.formatting]
style = "json"

[plugins.domains.pii]
enabled = ["forced", "pii"]
hold_back_chars = 32
settings.forced.text = "{PII_TEXT}"

[plugins.domains.restore]
enabled = ["forced", "pii"]
settings.forced.text = "Sure, I will write to [EMAIL_1] today."
settings.pii.restore = true

[plugins.domains.blocked]
enabled = ["forced", "blocklist"]
hold_back_chars = 24
settings.forced.text = "{BLOCKED_TEXT}"
settings.blocklist.terms = ["project falcon"]
settings.blocklist.message = "{BLOCK_MESSAGE}"

[plugins.domains.legal]
enabled = ["legal", "retry_once"]

[plugins.domains.crashy]
enabled = ["crashing"]

[plugins.domains.broken]
enabled = ["broken"]

[plugins.domains.slow]
enabled = ["slow"]

[plugins.domains.strict]
enabled = ["json_schema"]

[plugins.domains.gated]
enabled = ["file_gate"]
hook_timeout_s = 600
settings.file_gate.dir = "{gate}"
"""


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the file gate (tests/plugins/file_gate.py) of the "gated" domain."""
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def plugin_server(models: Models, gate: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    site = install_example_plugin(tmp_path_factory.mktemp("site"))
    env = dict(os.environ)
    env.pop(LOAD_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site) if site else None, str(ROOT),
                                                       env.get("PYTHONPATH")]))
    server = start_server(models, tmp_path_factory.mktemp("plugin-server"),
                          extra_config=plugin_config(models, gate), env=env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(plugin_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=plugin_server.api, api_key=USER_KEY, max_retries=0, timeout=120)


def chat(api: openai.OpenAI, model: str, **extra: Any) -> tuple[str, str | None, dict[str, Any]]:
    extra.setdefault("max_tokens", 160)
    reply = api.chat.completions.create(model=model, messages=extra.pop("messages", MESSAGES), temperature=0,
                                        **extra)
    choice = reply.choices[0]
    return choice.message.content or "", choice.finish_reason, (reply.model_extra or {}).get("lorag") or {}


def stream_chat(api: openai.OpenAI, model: str, **extra: Any) -> tuple[list[str], str | None, dict[str, Any]]:
    extra.setdefault("max_tokens", 160)
    stream = api.chat.completions.create(model=model, messages=extra.pop("messages", MESSAGES), temperature=0,
                                         stream=True, **extra)
    pieces, finish, extras = [], None, {}
    for chunk in stream:
        extras.update((chunk.model_extra or {}).get("lorag") or {})
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return pieces, finish, extras


def test_pii_never_reaches_the_client_streamed_or_not(api: openai.OpenAI) -> None:
    text, finish, _ = chat(api, "pii")
    assert (text, finish) == (PII_REDACTED, "stop")
    pieces, finish, _ = stream_chat(api, "pii")
    assert "".join(pieces) == PII_REDACTED and finish == "stop"
    assert len(pieces) > 2  # it did stream, in several pieces
    for value in PII_VALUES:
        assert all(value not in piece for piece in pieces)


def test_pii_in_the_input_is_redacted_and_restored_for_that_request_only(api: openai.OpenAI) -> None:
    mine = [{"role": "user", "content": "Please write to me at jane.doe@example.com"}]
    text, _, _ = chat(api, "restore", messages=mine)
    # the model saw [EMAIL_1] and repeated it; the user gets their own address back
    assert text == "Sure, I will write to jane.doe@example.com today."
    pieces, _, _ = stream_chat(api, "restore", messages=[{"role": "user", "content": "no address here"}])
    assert "".join(pieces) == "Sure, I will write to [EMAIL_1] today."  # another request's vault is empty


def test_blocklist_ends_with_content_filter_streamed_and_not(api: openai.OpenAI) -> None:
    text, finish, _ = chat(api, "blocked")
    assert finish == "content_filter" and BLOCK_MESSAGE in text and "Falcon" not in text
    pieces, finish, _ = stream_chat(api, "blocked")
    assert finish == "content_filter" and "".join(pieces) == text
    assert all("Falcon" not in piece for piece in pieces)
    assert "".join(pieces).startswith("Here is the plan")  # what came before the term was streamed


def test_blocklist_refuses_input(api: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(api, "blocked", messages=[{"role": "user", "content": "Tell me about Project Falcon"}])
    assert err.value.status_code == 400 and "content filter" in str(err.value)


def test_json_schema_response_format_is_valid_by_construction(api: openai.OpenAI) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    text, finish, _ = chat(api, "strict", response_format=response_format, max_tokens=40)
    jsonschema.validate(json.loads(text), SCHEMA)
    pieces, _, _ = stream_chat(api, "strict", response_format=response_format, max_tokens=40)
    assert "".join(pieces) == text


def test_json_schema_retries_then_fails_with_a_clear_error(api: openai.OpenAI, plugin_server: Server) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    with pytest.raises(openai.UnprocessableEntityError) as err:
        chat(api, "strict", response_format=response_format, max_tokens=3)
    assert "still rejected after 2 retries" in str(err.value) and "not JSON" in str(err.value)
    # streamed, the HTTP status is sent before generation: the error comes as an error event
    with pytest.raises(openai.APIError, match="still rejected after 2 retries") as streamed:
        stream_chat(api, "strict", response_format=response_format, max_tokens=3)
    assert not isinstance(streamed.value, openai.APIStatusError)


def test_invalid_response_format_schema_is_a_400(api: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError, match="not a valid JSON Schema"):
        chat(api, "strict", response_format=bad)


def test_formatting_json_on_the_default_domain(api: openai.OpenAI) -> None:
    text, _, extras = chat(api, "tiny-base", max_tokens=12)
    assert set(json.loads(text)) == {"answer"} and extras.get("format") == "json"
    pieces, _, _ = stream_chat(api, "tiny-base", max_tokens=12)
    assert "".join(pieces) == text


def test_example_plugin_through_the_server(api: openai.OpenAI) -> None:
    text, finish, extras = chat(api, "legal", max_tokens=16)
    assert text.endswith("---\n_This is general legal information, not legal advice. (US-CA)_")
    assert extras["legal"] == {"jurisdiction": "US-CA", "disclaimer": True}
    assert extras["attempts"] == 2  # retry_once rejected the first answer
    pieces, _, _ = stream_chat(api, "legal", max_tokens=16)
    assert "".join(pieces) == text


def test_crashing_filter_blocks_and_names_the_plugin(api: openai.OpenAI) -> None:
    text, finish, _ = chat(api, "crashy", max_tokens=16)
    assert finish == "content_filter" and "Plugin 'crashing' failed in output_chunk" in text
    pieces, finish, _ = stream_chat(api, "crashy", max_tokens=16)
    assert finish == "content_filter" and "".join(pieces) == text


def test_broken_plugin_fails_its_domain_only(api: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        chat(api, "broken")
    assert err.value.status_code == 503
    assert "plugin 'broken' failed to load: import failed: ModuleNotFoundError" in str(err.value)
    assert chat(api, "pii")[0] == PII_REDACTED


def test_slow_hook_times_out_while_other_domains_answer(api: openai.OpenAI) -> None:
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            chat(api, "slow", max_tokens=4)
        except BaseException as err:  # noqa: BLE001 - checked below
            errors.append(err)

    thread = threading.Thread(target=slow)
    thread.start()
    assert chat(api, "pii")[0] == PII_REDACTED
    thread.join(120)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], openai.InternalServerError)
    assert "Plugin 'slow' did not finish request_received within 1 s" in str(errors[0])


def test_plugins_list_shows_the_servers_plugins(plugin_server: Server) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [*sys.path]))}
    result = subprocess.run([sys.executable, "-m", "lorag.cli", "plugins", "list", "--json", "--config",
                             str(plugin_server.config_path)], capture_output=True, text=True, env=env,
                            cwd=Path(plugin_server.config_path).parent, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["legal"]["domains"] == ["legal"] and rows["pii"]["domains"] == ["pii", "restore"]
    assert rows["broken"]["status"] == "broken"


def test_an_adapter_version_removed_while_a_request_holds_it_never_kills_the_engine(
        api: openai.OpenAI, plugin_server: Server, models: Models, gate: Path) -> None:
    """vLLM loads a version's files when a request first needs it: the request holds the version
    (files included) from resolve to its last token, so a remove meanwhile waits for it. On main
    the files went at once, vLLM's worker raised FileNotFoundError and the engine core died."""
    (gate / "open").touch()
    before, _, extras = chat(api, "gated", max_tokens=16)
    assert extras["adapter"] == "gated@v1"
    (gate / "open").unlink()
    (gate / "entered").unlink()
    waiting = Background(lambda: chat(api, "gated", max_tokens=16))
    wait_for(lambda: (gate / "entered").exists(), what="the request to reach its input hook")
    v1 = plugin_server.state_dir / "adapters" / "gated" / "v1"
    with httpx.Client(base_url=plugin_server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as http:
        added = http.post("/admin/adapters", json={"name": "gated", "path": str(models.adapters["swap1"]),
                                                   "version": "v2"})
        assert added.status_code == 201, added.text
        assert http.delete("/admin/adapters/gated", params={"version": "v1"}).json() == {"removed": ["gated@v1"]}
        assert (v1 / "adapter_config.json").exists()  # the waiting request still holds it
        (gate / "open").touch()
        text, _, extras = waiting.result()
        assert (text, extras["adapter"]) == (before, "gated@v1")  # exactly its version, greedy
        assert http.get("/health").status_code == 200
    wait_for(lambda: not v1.exists(), what="v1's files to go once the request gave it back")
    assert chat(api, "gated", max_tokens=16)[2]["adapter"] == "gated@v2"

