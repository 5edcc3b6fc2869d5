"""Behind the fleet, faults that are the network's or an admin's, not the servers': none may fail a request.

One real vLLM server, reached through a TCP proxy (tests/idle_proxy.py) that cuts any keep-alive
connection written to after idling, as a server's keep-alive timeout does in the
race that failed 16 of 96 requests in benchmarks/fleet.py. The proxy can also take the server
away and bring it back. A file gate (tests/plugins/file_gate.py) holds a request in its input
hook while an admin replaces and removes its adapter version.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.background import Background
from tests.conftest import (
    ADMIN_KEY,
    ANSWER_TIMEOUT_S,
    BASE_NAME,
    MAX_LORAS,
    MAX_RANK,
    USER_KEY,
    Models,
    Server,
    free_port,
    start_server,
)
from tests.devserver import wait_for
from tests.idle_proxy import IdleClosingProxy
from tests.plugins.host import HERE
from tests.vllm_servers import VllmServer, start_vllm_servers

# The proxy's keep-alive: every connection lorag reuses after a pause has been closed. lorag's own
# keepalive_s is set far longer, so it meets closed ones, as it would with a server whose timeout is
# shorter than lorag's, or at the instant the two meet.
IDLE_S = 0.2


@dataclass
class Proxied:
    lorag: Server
    server: VllmServer
    proxy: IdleClosingProxy
    gate: Path


@pytest.fixture(scope="module")
def proxied(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    workdir = tmp_path_factory.mktemp("fleet-faults")
    gate = workdir / "gate"
    gate.mkdir()
    (server,) = start_vllm_servers(models.base, BASE_NAME, workdir / "vllm", [free_port()],
                                   max_loras=MAX_LORAS + 1, max_lora_rank=MAX_RANK)
    proxy = IdleClosingProxy(server.port, IDLE_S).start()
    engine = (f'backend = "remote"\n[[engine.servers]]\nurl = "{proxy.url}"\nname = "vllm-0"\n'
              "[engine.fleet]\nhealth_interval_s = 2\nreconcile_interval_s = 5\nkeepalive_s = 60\n"
              "wait_for_server_s = 600\n")
    config = f"""
[adapters.preload.swappy]
path = "{models.adapters["alpha"]}"
version = "v1"

[domains.swap]
adapter = "swappy"

[plugins]
modules = {{ file_gate = "{HERE / 'file_gate.py'}" }}

[plugins.domains.swap]
enabled = ["file_gate"]
hook_timeout_s = 600
settings.file_gate.dir = "{gate}"
"""
    try:
        lorag = start_server(models, workdir, preload=False, engine_lines=engine, extra_config=config)
    except BaseException:
        proxy.stop()
        server.stop()
        raise
    yield Proxied(lorag, server, proxy, gate)
    lorag.stop()
    proxy.stop()
    server.stop()


def api(proxied: Proxied) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxied.lorag.api, api_key=USER_KEY, max_retries=0, timeout=ANSWER_TIMEOUT_S)


def admin(proxied: Proxied) -> httpx.Client:
    return httpx.Client(base_url=proxied.lorag.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)


def ask(client: openai.OpenAI, model: str) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Notice?"}],
                                          max_tokens=8, temperature=0)


def server_status(proxied: Proxied) -> dict[str, Any]:
    with admin(proxied) as http:
        (status,) = http.get("/admin/fleet").json()["servers"]
    return status


def test_a_keepalive_connection_the_server_closed_fails_no_request(proxied: Proxied) -> None:
    client = api(proxied)
    cut = proxied.proxy.cut_idle
    for _ in range(4):
        time.sleep(IDLE_S * 3)  # idle past the server's keep-alive: lorag's pooled connections are now dead
        assert ask(client, BASE_NAME).choices[0].message.content is not None
    assert proxied.proxy.cut_idle > cut  # lorag did write to closed connections, and moved to new ones
    status = server_status(proxied)
    assert status["up"] and status["ready"] and status["resting_s"] == 0  # never held against the server


def test_a_request_waits_for_a_server_that_comes_back(proxied: Proxied) -> None:
    proxied.proxy.down = True
    try:
        wait_for(lambda: not server_status(proxied)["up"], what="lorag to see the server gone")
        waiting = Background(lambda: ask(api(proxied), BASE_NAME))
        wait_for(lambda: waiting.done or any(e.get("event") == "server_wait" for e in proxied.lorag.log_events()),
                 what="the request to wait for a server")
        assert not waiting.done, f"no server up: the request ended at once ({waiting.error!r})"
    finally:
        proxied.proxy.down = False
    assert waiting.result().choices[0].message.content is not None


def held_by(server: VllmServer) -> set[str]:
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def test_a_version_removed_while_a_request_holds_it_stays_on_the_server_until_it_is_done(
        proxied: Proxied, models: Models) -> None:
    client = api(proxied)
    waiting = Background(lambda: ask(client, "swap"))
    wait_for(lambda: (proxied.gate / "entered").exists(), what="the request to reach its input hook")
    with admin(proxied) as http:
        added = http.post("/admin/adapters", json={"name": "swappy", "path": str(models.adapters["swap1"]),
                                                   "version": "v2"})
        assert added.status_code == 201, added.text
        assert http.delete("/admin/adapters/swappy", params={"version": "v1"}).json() == {"removed": ["swappy@v1"]}
    assert "swappy@v1" in held_by(proxied.server)  # the waiting request still holds it
    (proxied.gate / "open").touch()
    reply = waiting.result()
    assert reply.model_extra["lorag"]["adapter"] == "swappy@v1" and reply.choices[0].message.content is not None
    wait_for(lambda: "swappy@v1" not in held_by(proxied.server), what="v1 to be unloaded once released")
    assert ask(client, "swap").model_extra["lorag"]["adapter"] == "swappy@v2"
