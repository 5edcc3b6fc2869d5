"""The adapter registry shared by lorag replicas through a real PostgreSQL server.

Real lorag apps (the echo engine reads only an adapter's folder) on one database and one shared
directory for adapter files: an adapter added and activated through A is served by B; two
activations from the same version at once (compare-and-swap): exactly one wins; and `lorag state
migrate` moves a state directory's registry in.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorag.adapters.registry import AdapterRegistry
from lorag.adapters.validate import AdapterInfo
from tests.echo_server import ADMIN_KEY, USER_KEY, EchoServer, echo_server, echo_settings
from tests.postgres_server import PostgresServer

pytestmark = pytest.mark.timeout(600)
WAIT_S = 60  # how long a test waits for a change to reach a replica (notifications; a loaded machine)
INFO = AdapterInfo(rank=8, alpha=8.0, target_modules=("q_proj",), base_model="echo-base")


def adapter_folder(tmp_path: Path, label: str) -> Path:
    source = tmp_path / f"source-{label}"
    source.mkdir(parents=True)
    (source / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (source / "adapter_model.safetensors").write_bytes(b"echo")
    return source


@contextlib.contextmanager
def replicas(tmp_path: Path, url: str, count: int = 2) -> Iterator[list[EchoServer]]:
    state = {"backend": "postgres", "url": url, "shared_dir": str(tmp_path / "shared")}
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(echo_server(echo_settings(tmp_path / f"replica-{i}", state=state)))
               for i in range(count)]


def served(replica: EchoServer, model: str) -> str:
    """The adapter version that answers `model` on this replica."""
    answer = httpx.post(f"{replica.url}/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {USER_KEY}"},
                        json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return str(answer.json()["lorag"]["adapter"]) if answer.status_code == 200 else str(answer.status_code)


def wait_until_served(replica: EchoServer, model: str, expected: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while (got := served(replica, model)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def activate(replica: EchoServer, name: str, version: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{replica.url}/admin/adapters/{name}/activate", json={"version": version, **extra},
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)


def test_an_adapter_added_and_activated_through_one_replica_is_served_by_another(
        tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.database("registry_everywhere")
    with replicas(tmp_path, url) as (a, b):
        assert served(b, "legal") == "404"
        a.pipeline.registry.register("legal", adapter_folder(tmp_path, "v1"), INFO, version="v1")
        assert wait_until_served(b, "legal", "legal@v1") == "legal@v1"
        a.pipeline.registry.register("legal", adapter_folder(tmp_path, "v2"), INFO, version="v2")
        assert wait_until_served(b, "legal", "legal@v2") == "legal@v2"  # registered as current
        assert activate(a, "legal", "v1").status_code == 200
        assert wait_until_served(b, "legal", "legal@v1") == "legal@v1"
        assert b.pipeline.registry.resolve("legal@v2").lora_int_id != b.pipeline.registry.resolve("legal@v1").lora_int_id
        cut = postgres.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE application_name = 'lorag-listener'")
        assert int(cut) >= 2
        assert activate(a, "legal", "v2").status_code == 200  # while B's listener may still be reconnecting
        assert wait_until_served(b, "legal", "legal@v2") == "legal@v2"


def test_two_activations_from_the_same_version_at_once_one_wins(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.database("registry_race")
    with replicas(tmp_path, url) as (a, b):
        for version in ("v1", "v2", "v3"):
            a.pipeline.registry.register("race", adapter_folder(tmp_path, version), INFO, version=version,
                                         activate=version == "v1")
        assert wait_until_served(b, "race", "race@v1") == "race@v1"
        barrier = threading.Barrier(2, timeout=60)
        answers: dict[str, httpx.Response] = {}

        def switch(replica: EchoServer, version: str) -> None:
            barrier.wait()
            answers[version] = activate(replica, "race", version, if_current="v1")

        threads = [threading.Thread(target=switch, args=args) for args in ((a, "v2"), (b, "v3"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        codes = sorted(answer.status_code for answer in answers.values())
        assert codes == [200, 409]
        loser = next(answer for answer in answers.values() if answer.status_code == 409)
        assert loser.json()["error"]["code"] == "activation_conflict"
        winner = next(version for version, answer in answers.items() if answer.status_code == 200)
        assert wait_until_served(a, "race", f"race@{winner}") == f"race@{winner}"
        assert wait_until_served(b, "race", f"race@{winner}") == f"race@{winner}"


def test_state_migrate_moves_a_registry_in(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.database("registry_migrated")
    files = AdapterRegistry(tmp_path / "shared")  # the state dir becomes the shared directory
    files.register("support", adapter_folder(tmp_path, "s1"), INFO, version="v1")
    config = tmp_path / "lorag.toml"
    config.write_text(f'state_dir = "{tmp_path / "shared"}"\n[model]\npath = "echo-base"\n'
                      f'[state]\nbackend = "postgres"\nurl = "{url}"\nshared_dir = "{tmp_path / "shared"}"\n')
    moved = subprocess.run([sys.executable, "-m", "lorag.cli", "state", "migrate", "--config", str(config)],
                           capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert moved.returncode == 0, moved.stderr
    assert "adapter registry: 1 adapters copied" in moved.stdout
    with replicas(tmp_path, url, count=1) as (a,):
        assert served(a, "support") == "support@v1"


def test_with_the_database_gone_a_replica_serves_the_versions_it_last_read(tmp_path: Path,
                                                                           postgres: PostgresServer) -> None:
    url = postgres.database("registry_outage")
    with replicas(tmp_path, url, count=1) as (a,):
        a.pipeline.registry.register("steady", adapter_folder(tmp_path, "v1"), INFO, version="v1")
        assert wait_until_served(a, "steady", "steady@v1") == "steady@v1"
        postgres.stop()
        try:
            deadline = time.monotonic() + WAIT_S
            while a.pipeline.registry.document.generation() == a.pipeline.registry._generation:
                assert time.monotonic() < deadline, "the listener never noticed the database going"
                time.sleep(0.05)
            # A failed re-read keeps what was read (keys, by contrast, fail closed: docs/operations.md).
            assert a.pipeline.registry.resolve("steady").ref == "steady@v1"
        finally:
            postgres.start()


def test_a_removed_versions_files_outlive_the_grace_and_orphans_are_swept(
        tmp_path: Path, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another replica may still load a version it resolved just before the removal: its files stay
    for the grace (the deadline, plus a margin, shortened here), then go; a folder left by a replica
    that stopped before its timer fired is swept at the next start, a fresh one is left alone."""
    import lorag.adapters.leases

    monkeypatch.setattr(lorag.adapters.leases, "REMOVAL_MARGIN_S", 1.0)
    state = {"backend": "postgres", "url": postgres.database("registry_files"), "shared_dir": str(tmp_path / "shared")}
    settings = echo_settings(tmp_path / "replica", state=state, server={"limits": {"generation_timeout_s": 1}})
    with echo_server(settings) as a:
        a.pipeline.registry.register("kept", adapter_folder(tmp_path, "k1"), INFO, version="v1")
        a.pipeline.registry.register("kept", adapter_folder(tmp_path, "k2"), INFO, version="v2")
        folder = Path(a.pipeline.registry.resolve("kept@v1").path)
        removed = httpx.delete(f"{a.url}/admin/adapters/kept?version=v1", timeout=60,
                               headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert removed.status_code == 200, removed.text
        assert folder.is_dir()  # still there for a replica that resolved it a moment ago
        deadline = time.monotonic() + WAIT_S
        while folder.exists():
            assert time.monotonic() < deadline, "the removed version's files were never deleted"
            time.sleep(0.1)
        service = a.app.state.adapters
        root = a.pipeline.registry.root
        stale, fresh = root / "gone" / "v1", root / "gone" / "v2"
        for orphan in (stale, fresh):
            orphan.mkdir(parents=True)
        os.utime(stale, (time.time() - 3600, time.time() - 3600))
        assert service.sweep() == [stale]
        assert fresh.is_dir() and Path(a.pipeline.registry.resolve("kept@v2").path).is_dir()
