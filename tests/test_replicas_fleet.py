"""Several lorags in front of one fleet: three `lorag serve` replicas sharing PostgreSQL (keys,
adapter registry, the fleet's leadership) and Redis (limits), and `lorag serve --workers 2` on one
state directory, all in front of a real vLLM OpenAI server with the tiny model.

Shown here: one leader among them; an adapter added through one replica is served by every other
and a version removed through another is unloaded from the server by the leader after the grace;
kill -9 of the leading replica under load leaves the others serving, and one of them takes over
the repairs; workers share the port, the registry and the leadership, and one killed is replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    ADMIN_KEY,
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
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer
from tests.vllm_servers import VllmServer, start_vllm_servers

pytestmark = pytest.mark.timeout(1800)
GRACE_S = 3  # [engine.fleet] unload_grace_s here: a removed version outlives its last request this long
WAIT_S = 180  # how long a change may take to show on a loaded machine (the bound is seconds)
TOKENS = 8


@pytest.fixture(scope="module")
def vllm(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    (server,) = start_vllm_servers(models.base, BASE_NAME, tmp_path_factory.mktemp("vllm"), [free_port()],
                                   max_loras=MAX_LORAS + 1, max_lora_rank=MAX_RANK)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    directory = Path(tempfile.mkdtemp(prefix="lorag-redis-"))  # short: a Unix socket path has ~100 bytes
    server = RedisServer(directory).start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def fleet_lines(vllm: VllmServer) -> str:
    return (f'backend = "remote"\n[[engine.servers]]\nurl = "{vllm.url}"\nname = "vllm-0"\n'
            f"[engine.fleet]\nhealth_interval_s = 0.5\nreconcile_interval_s = 2\nunload_grace_s = {GRACE_S}\n")


@pytest.fixture(scope="module")
def replicas(models: Models, vllm: VllmServer, postgres: PostgresServer, redis: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """Three replicas, each with its own state directory, sharing the database, Redis and a folder."""
    root = tmp_path_factory.mktemp("replicas")
    shared = f'\n[state]\nbackend = "postgres"\nurl = "{postgres.database("replicas")}"\nshared_dir = "{root / "shared"}"\n' \
             f'\n[server.limits]\nbackend = "redis"\nredis_url = "{redis.url}"\nreplicas = 3\nmax_concurrent_per_key = 64\n'
    started: list[Server] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            started.append(start_server(models, root / f"replica-{i}", preload=False, engine_lines=fleet_lines(vllm),
                                        extra_config=shared))
        except BaseException as err:  # reported below, after the others were stopped
            errors.append(err)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        if errors:
            raise errors[0]
        yield sorted(started, key=lambda s: s.url)
    finally:
        for server in started:
            with contextlib.suppress(Exception):
                server.stop()


def admin(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)


def leads(server: Server) -> bool:
    with admin(server) as http:
        return bool(http.get("/admin/fleet").json()["leader"])


def chat(server: Server, model: str) -> tuple[int, str]:
    """(status, the adapter version that answered) of one short answer, on a fresh connection."""
    answer = httpx.post(f"{server.api}/chat/completions", headers={"authorization": f"Bearer {USER_KEY}"}, timeout=300,
                        json={"model": model, "max_tokens": TOKENS, "temperature": 0,
                              "messages": [{"role": "user", "content": "What does the contract say?"}]})
    adapter = answer.json().get("lorag", {}).get("adapter") if answer.status_code == 200 else None
    return answer.status_code, str(adapter)


def held(vllm: VllmServer) -> set[str]:
    """The adapters the vLLM server holds now (its /v1/models)."""
    cards = httpx.get(f"{vllm.url}/v1/models", timeout=30).json()["data"]
    return {str(card["id"]) for card in cards if card.get("parent")}


def the_leader(servers: list[Server]) -> Server:
    wait_for(lambda: sum(leads(s) for s in servers) == 1, WAIT_S, "exactly one leader")
    return next(s for s in servers if leads(s))


# -- `lorag serve --workers 2`, first: its own state directory in front of the same server ---------------


def events(server: Server, name: str) -> list[dict[str, Any]]:
    return [e for e in server.log_events() if e.get("event") == name]


def worker_pids(server: Server) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(server.process.pid).children()
            if "resource_tracker" not in " ".join(child.cmdline())]


def test_workers_share_the_port_the_registry_and_one_leader_and_a_killed_worker_is_replaced(
        models: Models, vllm: VllmServer, tmp_path: Path) -> None:
    server = start_server(models, tmp_path / "workers", preload=False, engine_lines=fleet_lines(vllm),
                          serve_args=("--workers", "2"))
    try:
        wait_for(lambda: len(events(server, "fleet_open")) == 2, WAIT_S, "both workers open")
        assert sorted(e["leader"] for e in events(server, "fleet_open")) == [False, True]
        with admin(server) as http:
            added = http.post("/admin/adapters", json={"name": "shared", "path": str(models.adapters["alpha"])})
            assert added.status_code == 201, added.text
        ref = f"shared@{added.json()['version']}"
        # Fresh connections land on either worker: every one of them serves what the other registered.
        assert {chat(server, "shared") for _ in range(8)} == {(200, ref)}
        pids = worker_pids(server)
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        assert {chat(server, "shared") for _ in range(4)} == {(200, ref)}  # the other worker goes on
        wait_for(lambda: len(events(server, "fleet_open")) == 3, WAIT_S, "a new worker")
        assert {chat(server, "shared") for _ in range(8)} == {(200, ref)}
        wait_for(lambda: sum(1 for e in events(server, "leader_acquired") if e.get("role") == "fleet") >= 1,
                 WAIT_S, "a fleet leader")
    finally:
        code = server.stop()
    assert code == 0
    assert not any(psutil_alive(pid) for pid in pids[1:])


def psutil_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


# -- three replicas on PostgreSQL and Redis ----------------------------------------------------------


def test_one_leader_an_adapter_added_anywhere_is_served_everywhere_and_a_removed_one_is_unloaded_after_the_grace(
        replicas: list[Server], vllm: VllmServer, models: Models) -> None:
    a, b, c = replicas
    the_leader(replicas)
    with admin(a) as http:
        added = http.post("/admin/adapters", json={"name": "contracts", "path": str(models.adapters["alpha"])})
        assert added.status_code == 201, added.text
        first = added.json()["ref"] if "ref" in added.json() else f"contracts@{added.json()['version']}"
    for replica in (b, c):
        assert chat(replica, "contracts") == (200, first)
    with admin(b) as http:  # a second version through another replica, then the first removed there
        second = http.post("/admin/adapters", json={"name": "contracts", "path": str(models.adapters["beta"])})
        assert second.status_code == 201, second.text
        version = first.split("@", 1)[1]
        assert http.delete(f"/admin/adapters/contracts?version={version}").status_code == 200
    second_ref = f"contracts@{second.json()['version']}"
    for replica in replicas:
        wait_for(lambda r=replica: chat(r, "contracts") == (200, second_ref), WAIT_S, "the new version everywhere")
    wait_for(lambda: first not in held(vllm), WAIT_S, f"{first} unloaded by the leader")
    assert second_ref in held(vllm)


def test_the_leader_repairs_a_server_that_lost_an_adapter(replicas: list[Server], vllm: VllmServer,
                                                          models: Models) -> None:
    with admin(replicas[1]) as http:
        added = http.post("/admin/adapters", json={"name": "repaired", "path": str(models.adapters["gamma"])})
        assert added.status_code == 201, added.text
    ref = f"repaired@{added.json()['version']}"
    assert ref in held(vllm)
    httpx.post(f"{vllm.url}/v1/unload_lora_adapter", json={"lora_name": ref}, timeout=60).raise_for_status()
    wait_for(lambda: ref in held(vllm), WAIT_S, f"{ref} loaded again by the leader")


def lorag_keys(replica: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorag.cli", "keys", *args, "--config", str(replica.config_path)],
                          capture_output=True, text=True, timeout=120)


def statuses(replicas: list[Server], secret: str, expected: int) -> list[int]:
    """Each replica's answer to the key, once all give `expected` (or WAIT_S has passed)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        got = [httpx.get(f"{r.api}/models", headers={"authorization": f"Bearer {secret}"}, timeout=60).status_code
               for r in replicas]
        if all(code == expected for code in got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_a_key_created_through_one_replica_works_on_all_and_a_revoked_one_on_none_after_listeners_were_cut(
        replicas: list[Server], postgres: PostgresServer) -> None:
    a, b, c = replicas
    made = lorag_keys(a, "create", "--name", "e2e")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert statuses(replicas, secret, 200) == [200, 200, 200]
    cut = postgres.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                       "WHERE application_name = 'lorag-listener'")
    assert int(cut) >= 3  # every replica's LISTEN connection
    assert lorag_keys(b, "revoke", "e2e").returncode == 0
    assert statuses(replicas, secret, 401) == [401, 401, 401]


def test_kill_9_of_the_leader_under_load_the_others_keep_serving_and_one_takes_over(
        replicas: list[Server], vllm: VllmServer, models: Models) -> None:
    leader = the_leader(replicas)
    others = [s for s in replicas if s is not leader]
    with admin(leader) as http:
        added = http.post("/admin/adapters", json={"name": "survivor", "path": str(models.adapters["delta"])})
        assert added.status_code == 201, added.text
    ref = f"survivor@{added.json()['version']}"
    results: list[tuple[int, str]] = []
    on_the_killed: list[object] = []  # what its clients saw: answers, then connection errors
    stop = threading.Event()

    def load(server: Server, seen: list[Any]) -> None:
        while not stop.is_set():
            try:
                seen.append(chat(server, "survivor"))
            except httpx.HTTPError as err:
                seen.append(err)
                time.sleep(0.2)  # refused at once: no busy loop

    clients = [threading.Thread(target=load, args=(s, results)) for s in others for _ in range(2)]
    clients.append(threading.Thread(target=load, args=(leader, on_the_killed)))
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: len(results) >= 4, WAIT_S, "answers under load")
        os.kill(leader.process.pid, signal.SIGKILL)
        leader.process.wait(timeout=60)
        before = len(results)
        wait_for(lambda: len(results) >= before + 6, WAIT_S, "answers after the kill")
        new_leader = the_leader(others)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=600)
    assert results and all(result == (200, ref) for result in results), results
    assert any(isinstance(seen, httpx.HTTPError) for seen in on_the_killed)  # it was killed under load
    httpx.post(f"{vllm.url}/v1/unload_lora_adapter", json={"lora_name": ref}, timeout=60).raise_for_status()
    wait_for(lambda: ref in held(vllm), WAIT_S, f"{ref} loaded again by the new leader")
    assert leads(new_leader)
    assert chat(new_leader, "survivor") == (200, ref)
