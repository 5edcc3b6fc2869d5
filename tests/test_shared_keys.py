"""API keys shared by lorag replicas through a real PostgreSQL server ([state] backend = "postgres").

Three real lorag apps (the echo engine: keys need no generation) on one database: a key made with
`lorag keys create` works on every replica at once, a revoked one stops working on every replica
(also after their LISTEN connections were cut), and `lorag state migrate` moves a state
directory's keys.json in.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorag.errors import ConflictError
from lorag.server.keys import KeyStore, StoredKey
from lorag.server.keys_pg import PostgresKeyStore
from tests.echo_server import EchoServer, echo_server, echo_settings
from tests.postgres_server import PostgresServer

pytestmark = pytest.mark.timeout(600)
WAIT_S = 60  # how long a test waits for a change to reach a replica (the bound is 10 s; a loaded machine)


def lorag(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorag.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=os.getcwd())


def config_for(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "lorag.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[model]\npath = "echo-base"\n'
                      f'[state]\nbackend = "postgres"\nurl = "{url}"\n', encoding="utf-8")
    return config


def status(replica: EchoServer, secret: str) -> int:
    return httpx.get(f"{replica.url}/v1/models", headers={"authorization": f"Bearer {secret}"}, timeout=60).status_code


def wait_for(replicas: list[EchoServer], secret: str, expected: int) -> list[int]:
    """Every replica's answer to the key, once each gives `expected` (or WAIT_S has passed)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        got = [status(replica, secret) for replica in replicas]
        if all(code == expected for code in got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


@contextlib.contextmanager
def replicas(tmp_path: Path, url: str, count: int = 3) -> Iterator[list[EchoServer]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(echo_server(echo_settings(tmp_path / f"replica-{i}",
                                                             state={"backend": "postgres", "url": url})))
               for i in range(count)]


def test_a_key_works_on_every_replica_at_once_and_a_revoked_one_on_none(tmp_path: Path,
                                                                         postgres: PostgresServer) -> None:
    url = postgres.database("keys_everywhere")
    config = config_for(tmp_path, url)
    with replicas(tmp_path, url) as servers:
        first = lorag("keys", "create", "--name", "app", "--config", str(config))
        assert first.returncode == 0, first.stderr
        secret = first.stdout.strip()
        assert wait_for(servers, secret, 200) == [200, 200, 200]
        assert lorag("keys", "revoke", "app", "--config", str(config)).returncode == 0
        assert wait_for(servers, secret, 401) == [401, 401, 401]

        second = lorag("keys", "create", "--name", "batch", "--config", str(config)).stdout.strip()
        assert wait_for(servers, second, 200) == [200, 200, 200]
        cut = postgres.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE application_name = 'lorag-listener'")
        assert int(cut) >= 3  # every replica's LISTEN connection
        assert lorag("keys", "revoke", "batch", "--config", str(config)).returncode == 0
        assert wait_for(servers, second, 401) == [401, 401, 401]


def test_two_replicas_creating_one_name_at_once_make_one_key(postgres: PostgresServer) -> None:
    url = postgres.database("one_name")
    stores = [PostgresKeyStore(url) for _ in range(2)]
    stores[0].load()  # the schema first: both then race on the insert alone
    barrier = threading.Barrier(2, timeout=60)
    outcomes: list[str] = []

    def create(store: PostgresKeyStore) -> None:
        barrier.wait()
        try:
            store.create("twin")
            outcomes.append("created")
        except ConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=create, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(outcomes) == ["conflict", "created"]
    assert [key.name for key in stores[1].load()] == ["twin"]
    for store in stores:
        store.close()


def test_state_migrate_moves_a_state_directorys_keys_in_once(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.database("migrated")
    config = config_for(tmp_path, url)
    files = KeyStore(tmp_path / "state")
    _, kept = files.create("kept", admin=True)
    _, gone = files.create("gone")
    files.revoke("gone")
    moved = lorag("state", "migrate", "--config", str(config))
    assert moved.returncode == 0, moved.stderr
    assert "applied migrations 1" in moved.stdout and "API keys: 2 of 2 copied" in moved.stdout
    again = lorag("state", "migrate", "--config", str(config))
    assert "schema: up to date" in again.stdout and "API keys: 0 of 2 copied" in again.stdout
    store = PostgresKeyStore(url)
    def by_id(keys: list[StoredKey]) -> list[StoredKey]:
        return sorted(keys, key=lambda key: key.id)

    assert by_id(store.load()) == by_id(files.load())  # the same ids, hashes, scopes and revocations
    store.close()
    with replicas(tmp_path, url, count=1) as servers:
        assert status(servers[0], kept) == 200 and status(servers[0], gone) == 401


def test_an_unreachable_database_is_one_line_and_a_failed_exit() -> None:
    done = lorag("state", "migrate", "--url", "postgresql://nobody@/nowhere?host=/nonexistent-socket-dir")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "state database" in done.stderr


def test_with_the_database_gone_stored_keys_fail_closed_and_lorag_toml_keys_go_on(tmp_path: Path,
                                                                                  postgres: PostgresServer) -> None:
    """A stored key's revocation cannot be checked without the database: 500. A key written in
    lorag.toml needs no database: it keeps working, and the server stays responsive."""
    from tests.echo_server import USER_KEY

    url = postgres.database("keys_outage")
    config = config_for(tmp_path, url)
    with replicas(tmp_path, url, count=1) as (a,):
        stored = lorag("keys", "create", "--name", "batch", "--config", str(config)).stdout.strip()
        assert wait_for([a], stored, 200) == [200]
        postgres.stop()
        try:
            assert wait_for([a], stored, 500) == [500]  # within MAX_AGE_S: the listener says it was cut
            assert status(a, USER_KEY) == 200
            refused = httpx.get(f"{a.url}/v1/models", headers={"authorization": f"Bearer {stored}"}, timeout=60)
            assert refused.json()["error"]["code"] == "key_store_unreadable"
        finally:
            postgres.start()
        assert wait_for([a], stored, 200) == [200]
