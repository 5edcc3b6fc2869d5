"""Faults of the request path that hurt other requests, each through real HTTP on the echo engine.

One tenant's slow plugin, hung tool or unnamed key, and one admin's remove at the wrong
moment, must never stall, fail or throttle anyone else. The gates (tests/plugins/gate.py)
stop a request inside a hook until the test opens them, so each test proves an order of
events, never a duration.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from lorag.adapters.validate import AdapterInfo
from tests.background import Background
from tests.echo_server import ADMIN_KEY, USER_KEY, EchoServer, echo_server, echo_settings
from tests.plugins import gate as gates

EMAIL = "jane.doe@example.com"
SLOW = 120  # hook and tool deadlines far beyond any gate the tests hold
GATED = {"modules": {"gate": "tests.plugins.gate"}}


@pytest.fixture(autouse=True)
def fresh_gates() -> Iterator[None]:
    gates.GATES.clear()
    yield
    for gate in gates.GATES.values():  # let every thread a test left waiting go
        gate.opened.set()


def ask(client: openai.OpenAI, model: str, question: str = "hi", **extra: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **extra)


def test_a_slow_third_party_validator_never_stalls_another_domains_stream(tmp_path: Path) -> None:
    settings = echo_settings(tmp_path, domains={"checked": {}, "fast": {}}, plugins={**GATED, "domains": {
        "checked": {"enabled": ["gate"], "settings": {"gate": {"output": "validator"}}, "hook_timeout_s": SLOW}}})
    with echo_server(settings) as echo:
        client = echo.client()
        slow = Background(lambda: ask(client, "checked", "check me"))
        assert gates.gate("validator").entered.wait(SLOW)
        pieces = [chunk.choices[0].delta.content or "" for chunk in ask(client, "fast", "quick", stream=True)
                  if chunk.choices]
        assert "".join(pieces) == "echo: quick"
        # The other domain's whole stream came while the validator still ran (on main, the event
        # loop waited in the validator: nothing else moved until its deadline).
        assert not slow.done and gates.gate("validator").passed == 0
        gates.gate("validator").opened.set()
        assert slow.result().choices[0].message.content == "echo: check me"


def register(echo: EchoServer, tmp_path: Path, version: str) -> Any:
    """An adapter version straight into the registry (the echo engine reads only its folder)."""
    source = tmp_path / f"source-{version}"
    source.mkdir()
    (source / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (source / "adapter_model.safetensors").write_bytes(b"echo")
    info = AdapterInfo(rank=8, alpha=8.0, target_modules=("q_proj",), base_model="echo-base")
    return echo.pipeline.registry.register("swappy", source, info, version=version)


def test_a_version_replaced_and_removed_while_a_request_waits_still_answers_it(tmp_path: Path) -> None:
    """The request holds its version from resolve to last token: the remove waits for it."""
    settings = echo_settings(tmp_path, domains={"swap": {"adapter": "swappy"}}, plugins={**GATED, "domains": {
        "swap": {"enabled": ["gate"], "settings": {"gate": {"input": "swap"}}, "hook_timeout_s": SLOW}}})
    with echo_server(settings) as echo:
        first = register(echo, tmp_path, "v1")
        client = echo.client()
        waiting = Background(lambda: ask(client, "swap"))
        assert gates.gate("swap").entered.wait(SLOW)  # resolved to v1, now in its input hook
        register(echo, tmp_path, "v2")  # the replacement, current from now on
        with echo.admin() as admin:
            removed = admin.delete("/admin/adapters/swappy", params={"version": "v1"})
        assert removed.json() == {"removed": ["swappy@v1"]}
        assert Path(first.path, "adapter_config.json").exists()  # the waiting request still holds it
        gates.gate("swap").opened.set()
        reply = waiting.result()
        assert reply.model_extra["lorag"]["adapter"] == "swappy@v1" and echo.engine.alive
        assert not Path(first.path).exists()  # released with the request's last token
        assert ask(client, "swap").model_extra["lorag"]["adapter"] == "swappy@v2"
        with echo.admin() as admin:
            scraped = admin.get("/metrics").text
        assert "swappy@v2" in scraped and "swappy@v1" not in scraped  # its series went with it


def raw_http(port: int, head: bytes, chunks: list[bytes], finish: bool) -> tuple[int, dict[str, Any]]:
    """Send a chunked request by hand (no client sends a body it has not finished); (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SLOW) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if finish:
            sock.sendall(b"0\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < _length(received):
            data = sock.recv(65536)
            if not data:
                break
            received += data
    header, body = received.split(b"\r\n\r\n", 1)
    return int(header.split()[1]), json.loads(body[:_length(received)])


def _length(received: bytes) -> int:
    for line in received.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def test_a_chunked_body_over_the_limit_is_refused_without_waiting_for_the_rest(tmp_path: Path) -> None:
    settings = echo_settings(tmp_path, server={"max_request_bytes": 4096})
    with echo_server(settings) as echo:
        port = int(echo.url.rsplit(":", 1)[1])
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: lorag\r\nAuthorization: Bearer " + USER_KEY.encode()
                + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        small = json.dumps({"model": "echo-base", "messages": [{"role": "user", "content": "hi"}]}).encode()
        assert raw_http(port, head, [small[:10], small[10:]], finish=True)[0] == 200
        # 8 KiB of a body that never ends: the 413 comes anyway, once the limit is passed.
        status, body = raw_http(port, head, [b"x" * 1024] * 8, finish=False)
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_pii_in_an_auto_question_never_reaches_routing(tmp_path: Path) -> None:
    settings = echo_settings(tmp_path, domains={
        "medical": {"description": "Health and medicine: symptoms, drugs, dosage, doctors."},
        "legal": {"description": "Tenancy and contract law: landlords, leases, deposits."}})
    with echo_server(settings) as echo:
        router = echo.pipeline.router
        seen: list[str] = []
        real_route = router.route

        def route(question: str, principal: Any = None) -> Any:
            seen.append(question)
            return real_route(question, principal)

        router.route = route
        reply = ask(echo.client(), "auto", f"I am {EMAIL}; how much ibuprofen may I take?")
    assert len(seen) == 1 and EMAIL not in seen[0] and "[EMAIL_1]" in seen[0]
    assert reply.model_extra["lorag"]["route"]["domain"] == "medical"


def test_routing_past_its_timeout_goes_to_the_fallback(tmp_path: Path) -> None:
    settings = echo_settings(tmp_path, domains={"general": {}, "medical": {"description": "Drugs and dosage."}},
                             routing={"fallback": "general", "timeout_s": 0.1})
    with echo_server(settings) as echo:
        stuck = gates.gate("routing")
        echo.pipeline.router.route = lambda question, principal=None: stuck.wait()  # a store that hangs
        reply = ask(echo.client(), "auto", "How much ibuprofen?")
        assert reply.model_extra["lorag"]["route"] == {"domain": "general", "score": 0.0, "confident": False,
                                                       "scores": {}}
        echo.pipeline.settings.routing.fallback = None
        with pytest.raises(openai.InternalServerError) as err:
            ask(echo.client(), "auto", "How much ibuprofen?")
    assert err.value.status_code == 503 and err.value.code == "routing_unavailable"


def test_a_hung_tool_never_takes_the_threads_input_hooks_need(tmp_path: Path) -> None:
    """Tools time out into a lane of their own; their threads, still hung, starve nobody else."""
    call = '<tool_call>{"name": "hang", "arguments": {"topic": "x"}}</tool_call>'
    settings = echo_settings(
        tmp_path, domains={"tooly": {"tools": {"enabled": ["hang"], "timeout_s": 0.2}}, "hooked": {}},
        plugins={**GATED, "modules": {**GATED["modules"], "retry_once": "tests.plugins.retry_once"},
                 "domains": {"tooly": {"enabled": ["gate"]}, "hooked": {"enabled": ["retry_once"]}}},
        threads={"tools": 2})
    with echo_server(settings) as echo:
        client = echo.client()
        hung = 12  # more than the loop's default executor has threads (cpu + 4): on main they took them all
        def step(prompt: str, adapter: Any) -> str:  # the call, then an answer once its result is in
            return "no luck" if "<|tool|>" in prompt else call

        echo.engine.reply(*[step] * (2 * hung))
        answers = [Background(lambda: ask(client, "tooly")) for _ in range(hung)]
        for answer in answers:
            tools = answer.result().model_extra["lorag"]["tools"]["calls"]
            assert "timed out" in tools[0]["error"]
        echo.engine.reply("one", "two")  # retry_once (a third-party input hook) rejects the first
        assert ask(echo.client(timeout=2 * gates.WAIT_S), "hooked").choices[0].message.content == "two"
        # ... answered while every tool thread was still hung (on main it waited for them to give up)
        assert gates.gate("tool").passed == gates.gate("tool").gave_up == 0


def test_limits_tell_unnamed_keys_apart(tmp_path: Path) -> None:
    keys = [{"key": "sk-first-unnamed-key"}, {"key": "sk-second-unnamed-key"}, {"key": ADMIN_KEY, "admin": True}]
    settings = echo_settings(tmp_path, domains={"held": {}, "free": {}},
                             server={"api_keys": keys, "limits": {"max_concurrent_per_key": 1}},
                             plugins={**GATED, "domains": {"held": {
                                 "enabled": ["gate"], "settings": {"gate": {"input": "held"}}, "hook_timeout_s": SLOW}}})
    with echo_server(settings) as echo:
        first, second = echo.client("sk-first-unnamed-key"), echo.client("sk-second-unnamed-key")
        holding = Background(lambda: ask(first, "held"))
        assert gates.gate("held").entered.wait(SLOW)
        assert ask(second, "free").choices[0].message.content == "echo: hi"  # its own slot
        with pytest.raises(openai.RateLimitError):
            ask(first, "free")  # the first key's one slot is taken
        gates.gate("held").opened.set()
        holding.result()
