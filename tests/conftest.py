"""Shared fixtures: a tiny model and adapters built locally, and a real `lorag serve` process.

Starting vLLM costs ~20 s on CPU, so one server serves the whole session; tests
that need their own (restart) start it themselves with `start_server`. Every test that
starts an engine, itself or through a fixture, is marked `engine`: `pytest -m "not engine"`
is the fast loop (the request path runs there on tests/echo_engine.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorag.demo.devmodel import build_tiny_model
from tests.devserver import stop_process, wait_until_up
from tests.random_adapter import build_random_adapter

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("LORAG_TEST_MODELS", ROOT / ".lorag-test-models"))
ADMIN_KEY = "sk-admin-test-key"
USER_KEY = "sk-user-test-key"
MAX_LORAS = 2
MAX_RANK = 8
BASE_NAME = "tiny-base"
SERVED_ADAPTERS = ("alpha", "beta", "gamma", "delta")
TEST_BACKEND_ENV = "LORAG_TEST_BACKEND"  # "remote": the session server fronts a fleet of vLLM servers

# Every vLLM CPU engine the tests start (and the subprocesses they start) floats over the cores.
# vLLM's default binds each engine's model worker to the same first core of the host: beside a
# second heavy engine there (a `lorag eval` on this machine), a starting vLLM server took > 600 s
# to answer /health against 43 s unbound, and the fleet tests timed out. The tests check answers,
# not speed; a dedicated server keeps vLLM's binding (docs/scale.md).
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


# Code that starts a vLLM engine: a `lorag serve` process, the demo, the in-process engine.
ENGINE_STARTS = re.compile(r"start_server\(|start_fleet\(|lorag_demo\(|\[\"serve\"|LocalPipeline\(|\bEngine\(settings")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `engine` every test whose own code, or any fixture it uses, starts an engine."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        functions = [defs[-1].func for defs in (fixtures.name2fixturedefs.values() if fixtures else [])]
        functions.append(getattr(item, "function", None))
        if any(_starts_engine(function) for function in functions if function is not None):
            item.add_marker(pytest.mark.engine)


@functools.cache
def _starts_engine(function: object) -> bool:
    try:
        return bool(ENGINE_STARTS.search(inspect.getsource(function)))  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False


@dataclass
class Models:
    base: Path
    adapters: dict[str, Path]  # name -> PEFT dir, all under `root`
    root: Path


@pytest.fixture(scope="session")
def models() -> Models:
    """Tiny base model plus six distinct random adapters (cached between runs)."""
    base = build_tiny_model(MODELS / "tiny-llama")
    names = (*SERVED_ADAPTERS, "swap1", "swap2")
    adapters = {
        name: build_random_adapter(base, MODELS / "adapters" / name, seed=index + 1, rank=MAX_RANK)
        for index, name in enumerate(names)
    }
    return Models(base=base, adapters=adapters, root=MODELS / "adapters")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    state_dir: Path
    config_path: Path

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    events.append(json.loads(line))
        return events

    def completion_tokens(self, request_id: str) -> int | None:
        """The tokens the request's `generate` event counted (None until it is logged)."""
        counted = [e["completion_tokens"] for e in self.log_events()
                   if e.get("event") == "generate" and e.get("request_id") == request_id]
        return counted[-1] if counted else None

    def stop(self) -> int:
        return stop_process(self.process)


def write_config(path: Path, models: Models, state_dir: Path, port: int, preload: bool = True,
                 extra_keys: str = "", engine_lines: str = "") -> Path:
    preload_lines = "".join(
        f'[adapters.preload.{name}]\npath = "{models.adapters[name]}"\n' for name in SERVED_ADAPTERS
    ) if preload else ""
    path.write_text(f"""
state_dir = "{state_dir}"

[model]
path = "{models.base}"
name = "{BASE_NAME}"
max_model_len = 512

[engine]
max_loras = {MAX_LORAS}
max_lora_rank = {MAX_RANK}
enforce_eager = true
kv_cache_memory_bytes = 268435456
{engine_lines}
[server]
port = {port}
api_keys = [
  {{ key = "{ADMIN_KEY}", name = "ops", admin = true }},
  {{ key = "{USER_KEY}", name = "app" }},
{extra_keys}]

[adapters]
allowed_roots = ["{models.root}"]
{preload_lines}""")
    return path


def start_server(models: Models, workdir: Path, *, preload: bool = True, state_dir: Path | None = None,
                 extra_config: str = "", env: dict[str, str] | None = None, extra_keys: str = "",
                 engine_lines: str = "", serve_args: tuple[str, ...] = ()) -> Server:
    """A `lorag serve` subprocess on a free port; `extra_config` is appended to its lorag.toml.

    `extra_keys`: more inline tables for server.api_keys, each followed by a comma;
    `engine_lines`: more keys of the [engine] table (the fleet tests' remote backend).
    `serve_args`: more flags for `lorag serve` (e.g. --workers).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    state_dir = state_dir or workdir / "state"
    config = write_config(workdir / "lorag.toml", models, state_dir, port, preload, extra_keys, engine_lines)
    config.write_text(config.read_text() + extra_config)
    log_path = workdir / "server.log"
    env = {"LORAG_LOG_FORMAT": "json", "VLLM_LOGGING_LEVEL": "WARNING", **(env or dict(os.environ))}
    process = subprocess.Popen(
        [sys.executable, "-m", "lorag.cli", "serve", "--config", str(config), *serve_args],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=workdir,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log_path, state_dir, config)
    wait_until_up(process, server.url, log_path, timeout_s=240)
    return server


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Two shared cores: in-process training takes one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Fleet:
    """`lorag serve` with the remote backend in front of vLLM OpenAI servers (tests/vllm_servers.py)."""

    lorag: Server
    servers: list[Any]  # tests.vllm_servers.VllmServer

    def stop(self) -> None:
        self.lorag.stop()
        for server in self.servers:
            server.stop()


def start_fleet(models: Models, workdir: Path, *, count: int = 2, server_lines: dict[int, str] | None = None,
                engine_lines: str = "", fleet_lines: str = "", **kwargs: Any) -> Fleet:
    """`count` vLLM servers (the null adapter takes one more LoRA slot, as in process), then lorag
    in front of them; `server_lines`: more keys for the [[engine.servers]] entry of server i;
    `fleet_lines`: more keys for [engine.fleet]."""
    from tests.vllm_servers import start_vllm_servers

    servers = start_vllm_servers(models.base, BASE_NAME, workdir / "vllm", [free_port() for _ in range(count)],
                                 max_loras=MAX_LORAS + 1, max_lora_rank=MAX_RANK)
    entries = "".join(f'[[engine.servers]]\nurl = "{s.url}"\nname = "vllm-{i}"\n{(server_lines or {}).get(i, "")}\n'
                      for i, s in enumerate(servers))
    fleet_table = f"[engine.fleet]\nhealth_interval_s = 0.5\nreconcile_interval_s = 5\n{fleet_lines}\n"
    try:
        lorag = start_server(models, workdir, engine_lines=f'backend = "remote"\n{engine_lines}\n{entries}{fleet_table}',
                             **kwargs)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return Fleet(lorag, servers)


@pytest.fixture(scope="session")
def server(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The session's `lorag serve`; with LORAG_TEST_BACKEND=remote, in front of two vLLM servers."""
    if os.environ.get(TEST_BACKEND_ENV) == "remote":
        fleet = start_fleet(models, tmp_path_factory.mktemp("fleet"))
        yield fleet.lorag
        fleet.stop()
        return
    srv = start_server(models, tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


# How long a test waits for one answer: generous, since a loaded machine (a second vLLM engine
# beside the suite) can slow a small answer from a second to minutes; the tests check answers, not speed.
ANSWER_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def client(server: Server):  # -> openai.OpenAI
    import openai

    return openai.OpenAI(base_url=server.api, api_key=USER_KEY, max_retries=0, timeout=ANSWER_TIMEOUT_S)


@pytest.fixture
def async_client(server: Server):  # -> openai.AsyncOpenAI
    """Per test: its connection pool belongs to the event loop of that test's asyncio.run()."""
    import openai

    return openai.AsyncOpenAI(base_url=server.api, api_key=USER_KEY, max_retries=0, timeout=ANSWER_TIMEOUT_S)


@pytest.fixture(scope="session")
def admin(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server (Debian's, on a Unix socket) for a test module: tests/postgres_server.py."""
    import shutil
    import tempfile

    from tests.postgres_server import PostgresServer

    directory = Path(tempfile.mkdtemp(prefix="lorag-pg-"))  # under /tmp: the postgres user must reach it
    server = PostgresServer(directory).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
