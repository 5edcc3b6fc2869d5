"""API keys: the hashed key store, `lorag keys`, scopes on every endpoint, and revocation on a running server.

The pure parts (hashing, the store, identify, config validation, the serve bind decision)
are tested directly; the scope matrix and revocation go through one real `lorag serve`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from lorag.config import ApiKey, ConfigError, load_settings
from lorag.errors import AuthenticationError
from lorag.server.auth import ANONYMOUS_ADMIN, Keyring, entry_for, identify
from lorag.server.keys import KeyStore, hash_secret
from lorag.server.keys_cli import keys_group
from tests.conftest import ADMIN_KEY, USER_KEY, Models, Server, start_server

PUBLIC = {"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/redoc"}


@pytest.fixture(autouse=True)
def no_ambient_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ./lorag.toml or $LORAG_CONFIG from the machine running the tests (CLI runs see this too)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORAG_CONFIG", raising=False)
    monkeypatch.delenv("LORAG_STATE_DIR", raising=False)


def lorag(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console entry point (one-line errors, exit codes)."""
    return subprocess.run([sys.executable, "-m", "lorag.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=os.getcwd())


# -- the store ----------------------------------------------------------------------


def test_store_keeps_only_hashes_in_a_private_file(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "state")
    entry, secret = store.create("app", domains=["legal"], overrides=False)
    assert secret.startswith("lrg-") and len(secret) >= 40
    assert entry.hash == hash_secret(secret) and entry.prefix == secret[:12]
    text = store.path.read_text()
    assert secret not in text and secret[12:20] not in text
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert not list(store.path.parent.glob(".keys.json.*"))  # no temporary left behind
    [loaded] = store.load()
    assert loaded == entry and loaded.scopes.domains == ("legal",) and not loaded.scopes.overrides
    other, other_secret = store.create("other")
    assert other_secret != secret and other.id != entry.id
    assert not entry.scopes.fine_tune and not other.as_api_key().fine_tune  # granted, never by default
    trainer, _ = store.create("trainer", fine_tune=True)
    assert store.load()[-1] == trainer and trainer.scopes.fine_tune and trainer.as_api_key().fine_tune
    assert trainer.scopes.describe() == "domains=* knowledge overrides fine-tune"


def test_a_key_store_written_before_the_fine_tune_scope_loads_without_it(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    old_scopes = {"admin": False, "domains": None, "knowledge": True, "overrides": True}
    store.path.write_text(json.dumps({"version": 1, "keys": [
        {"id": "key_0001", "name": "old", "prefix": "lrg-abcdefgh", "hash": hash_secret("lrg-old-secret"),
         "created_at": "2026-01-01T00:00:00Z", "revoked_at": None, "scopes": old_scopes}]}))
    [old] = store.load()
    assert old.scopes.fine_tune is False and old.scopes.describe() == "domains=* knowledge overrides"
    principal = identify(Keyring([], store).entries(), "Bearer lrg-old-secret")
    assert principal.name == "old" and not principal.fine_tune


def test_store_names_revocation_and_reuse(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    first, _ = store.create("app")
    with pytest.raises(Exception, match="already exists"):
        store.create("app")
    with pytest.raises(Exception, match="invalid key name"):
        store.create("has space")
    with pytest.raises(Exception, match="already configured in lorag.toml"):
        store.create("ops", reserved_names=frozenset({"ops"}))
    with pytest.raises(Exception, match="admin key has every scope"):
        store.create("x", admin=True, domains=["legal"])
    revoked = store.revoke("app")
    assert revoked.id == first.id and revoked.revoked_at is not None
    with pytest.raises(Exception, match="already revoked"):
        store.revoke(first.id)
    second, _ = store.create("app")  # a revoked name may be reused (key rotation)
    assert store.revoke("app").id == second.id  # by name: the active one
    with pytest.raises(Exception, match="no key with name or id"):
        store.revoke("nobody")


# -- identify and the keyring ----------------------------------------------------------


def test_identify_config_and_stored_keys_with_scopes(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    _, user_secret = store.create("scoped", domains=["legal"], knowledge=False)
    ring = Keyring([ApiKey(key="plain-admin-key", name="ops", admin=True),
                    ApiKey(hash=hash_secret("hashed-config-key"), name="hashed")], store)
    entries = ring.entries()
    assert identify(entries, "Bearer plain-admin-key").admin
    assert identify(entries, "bearer hashed-config-key").name == "hashed"
    scoped = identify(entries, f"Bearer {user_secret}")
    assert (scoped.name, scoped.admin, scoped.knowledge, scoped.overrides) == ("scoped", False, False, True)
    assert not scoped.fine_tune
    assert scoped.may_use("legal") and not scoped.may_use("medical")
    for header in (None, "", "Bearer ", "Basic plain-admin-key", "Bearer wrong", "Bearer plain-admin-keyX"):
        with pytest.raises(AuthenticationError):
            identify(entries, header)
    # Revocation is seen on the next call: keys.json was replaced, its stat changed.
    store.revoke("scoped")
    with pytest.raises(AuthenticationError, match="revoked"):
        identify(ring.entries(), f"Bearer {user_secret}")
    _, fresh = store.create("fresh")
    assert identify(ring.entries(), f"Bearer {fresh}").name == "fresh"


def test_open_only_without_keys_and_when_not_required() -> None:
    assert identify([], None) is ANONYMOUS_ADMIN
    with pytest.raises(AuthenticationError):
        identify([], "Bearer anything", required=True)
    # A store whose keys are all revoked is not "no keys": still closed.
    revoked = entry_for(ApiKey(key="revoked-key"), revoked=True)
    with pytest.raises(AuthenticationError):
        identify([revoked], None)


def test_config_keys_validate(tmp_path: Path) -> None:
    digest = hash_secret("a-config-secret")
    config = tmp_path / "lorag.toml"
    config.write_text(f'[[server.api_keys]]\nhash = "{digest}"\nname = "svc"\ndomains = ["legal"]\n'
                      'knowledge = false\noverrides = false\n')
    [key] = load_settings(config).server.api_keys
    assert key.key is None and key.sha256 == digest and key.domains == ["legal"] and not key.fine_tune
    # fine_tune only widens a key: on an admin key it is redundant, not refused.
    config.write_text(f'[[server.api_keys]]\nhash = "{digest}"\nfine_tune = true\n'
                      '[[server.api_keys]]\nkey = "an-admin-secret"\nadmin = true\nfine_tune = true\n')
    trainer, admin = load_settings(config).server.api_keys
    assert trainer.fine_tune and identify([entry_for(trainer)], "Bearer a-config-secret").fine_tune
    assert admin.admin and admin.fine_tune
    assert ApiKey(key="a-config-secret").sha256 == digest
    for body, expected in [
        ('[[server.api_keys]]\nname = "x"\n', "server.api_keys.0: Value error, set exactly one of `key` or `hash`"),
        (f'[[server.api_keys]]\nkey = "12345678"\nhash = "{digest}"\n', "exactly one"),
        ('[[server.api_keys]]\nhash = "md5:abc"\n', "server.api_keys.0.hash"),
        ('[[server.api_keys]]\nkey = "12345678"\nadmin = true\ndomains = ["a"]\n', "admin key has every scope"),
        ('[[server.api_keys]]\nkey = "12345678"\nname = "a"\n[[server.api_keys]]\nkey = "87654321"\nname = "a"\n',
         "key names must be unique: a"),
    ]:
        config.write_text(body)
        with pytest.raises(ConfigError) as info:
            load_settings(config)
        assert expected in str(info.value) and "12345678" not in str(info.value)


# -- the CLI ---------------------------------------------------------------------------


def test_keys_cli_create_list_revoke(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    runner = CliRunner()
    created = runner.invoke(keys_group, ["create", "--name", "app", "--domain", "legal", "--no-overrides",
                                         "--state-dir", state])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    assert secret.startswith("lrg-") and "\n" not in secret  # stdout is the secret alone, for scripts
    assert "shown only this once" in created.stderr
    assert runner.invoke(keys_group, ["create", "--name", "ops", "--admin", "--state-dir", state]).exit_code == 0
    trainer = runner.invoke(keys_group, ["create", "--name", "trainer", "--fine-tune", "--state-dir", state])
    assert trainer.exit_code == 0 and "fine-tune" in trainer.stderr, trainer.output
    listed = runner.invoke(keys_group, ["list", "--state-dir", state])
    assert listed.exit_code == 0 and "app" in listed.stdout and "domains=legal knowledge no-overrides" in listed.stdout
    rows = {line.split()[1]: line for line in listed.stdout.splitlines()[1:]}
    assert "domains=* knowledge overrides fine-tune" in rows["trainer"] and "fine-tune" not in rows["app"]
    as_json = json.loads(runner.invoke(keys_group, ["list", "--json", "--state-dir", state]).stdout)
    assert {k["name"] for k in as_json["keys"]} == {"app", "ops", "trainer"}
    assert {k["name"]: k["scopes"]["fine_tune"] for k in as_json["keys"]} == {"app": False, "ops": False, "trainer": True}
    text = listed.stdout + json.dumps(as_json)
    assert secret not in text and "sha256" not in text and hash_secret(secret)[7:] not in text
    assert runner.invoke(keys_group, ["revoke", "app", "--state-dir", state]).exit_code == 0
    assert "app" not in runner.invoke(keys_group, ["list", "--state-dir", state]).stdout
    assert "revoked" in runner.invoke(keys_group, ["list", "--all", "--state-dir", state]).stdout


def test_keys_cli_errors_are_one_line(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    assert lorag("keys", "create", "--name", "app", "--state-dir", state).returncode == 0
    for args, message in [
        (("create", "--name", "app"), "error: a key named 'app' already exists"),
        (("revoke", "ghost"), "error: no key with name or id 'ghost'"),
        (("create", "--name", "boss", "--admin", "--domain", "legal"), "error: an admin key has every scope"),
    ]:
        result = lorag("keys", *args, "--state-dir", state)
        assert result.returncode != 0 and result.stderr.strip().splitlines() == [result.stderr.strip()], result
        assert result.stderr.startswith(message), result.stderr
    (Path(state) / "keys.json").write_text("{not json")
    damaged = lorag("keys", "list", "--state-dir", state)
    assert damaged.returncode != 0 and "key store" in damaged.stderr and "damaged" in damaged.stderr


# -- serve: with no keys, loopback only ------------------------------------------------


@pytest.mark.parametrize("with_store_key", [False, True])
def test_serve_binds_loopback_without_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           with_store_key: bool) -> None:
    """The bind decision only: the socket, uvicorn and the app are doubles (starting vLLM proves nothing here)."""
    import uvicorn

    from lorag.server import app as server
    from lorag.server import cli as serve_cli

    if with_store_key:
        KeyStore(tmp_path / "state").create("app")
    seen: dict[str, Any] = {}

    class FakeApp:
        class state:  # noqa: N801 - mimics app.state
            pass

    from lorag.models import check

    monkeypatch.setattr(check, "check_model", lambda model: None)  # model "m" is no model: not what this tests
    monkeypatch.setattr(server, "create_app", lambda settings: FakeApp())
    from lorag.server import listen

    monkeypatch.setattr(listen, "bind_listener", lambda host, port: seen.update(host=host) or "socket")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: seen.update(app=self.config.app))
    monkeypatch.setattr(serve_cli.signal, "signal", lambda *a: None)
    result = CliRunner().invoke(serve_cli.serve, ["--model", "m", "--host", "0.0.0.0",
                                                    "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 0, result.output
    if with_store_key:
        assert seen["host"] == "0.0.0.0" and seen["app"].state.keys_required is True
        assert "No API keys" not in result.stderr
    else:
        assert seen["host"] == "127.0.0.1" and seen["app"].state.keys_required is False
        assert "No API keys configured" in result.stderr and "loopback only" in result.stderr


# -- a real server: every endpoint x key kind, and revocation without restart ------------


@pytest.fixture(scope="module")
def keyed_server(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict]]:
    workdir = tmp_path_factory.mktemp("keys")
    store = KeyStore(workdir / "state")
    secrets = {
        "store_admin": store.create("store-admin", admin=True)[1],
        "store_user": store.create("store-user")[1],
        "no_knowledge": store.create("no-knowledge", knowledge=False)[1],
        "store_fine_tune": store.create("trainer", fine_tune=True)[1],
        "revoked": store.create("old")[1],
        "config_admin": ADMIN_KEY,
        "config_user": USER_KEY,
        "bogus": "lrg-" + "x" * 43,
    }
    store.revoke("old")
    srv = start_server(models, workdir, preload=False)
    yield srv, secrets
    srv.stop()


def required_scope(method: str, path: str) -> str:
    """What each route needs: admin for /admin and knowledge writes, the knowledge scope to read bases,
    the fine_tune scope for files, fine-tuning and training files made from stored completions."""
    if path.startswith("/admin"):
        return "admin"
    if path.startswith(("/v1/files", "/v1/fine_tuning", "/v1/training_data")):
        return "fine_tune"
    if path.startswith("/v1/knowledge"):
        return "knowledge" if method == "get" or path.endswith("/query") else "admin"
    return "key"


EXPECTED = {  # key kind -> scope -> status class
    "none": {"key": 401, "knowledge": 401, "admin": 401, "fine_tune": 401},
    "bogus": {"key": 401, "knowledge": 401, "admin": 401, "fine_tune": 401},
    "revoked": {"key": 401, "knowledge": 401, "admin": 401, "fine_tune": 401},
    "no_knowledge": {"key": "ok", "knowledge": 403, "admin": 403, "fine_tune": 403},
    "store_user": {"key": "ok", "knowledge": "ok", "admin": 403, "fine_tune": 403},
    "store_fine_tune": {"key": "ok", "knowledge": "ok", "admin": 403, "fine_tune": "ok"},
    "config_user": {"key": "ok", "knowledge": "ok", "admin": 403, "fine_tune": 403},
    "store_admin": {"key": "ok", "knowledge": "ok", "admin": "ok", "fine_tune": "ok"},
    "config_admin": {"key": "ok", "knowledge": "ok", "admin": "ok", "fine_tune": "ok"},
}


@pytest.mark.engine
def test_every_endpoint_by_key_kind(keyed_server: tuple[Server, dict]) -> None:
    """Routes come from the server's own OpenAPI document, so a new route cannot skip this."""
    srv, secrets = keyed_server
    spec = httpx.get(f"{srv.url}/openapi.json", timeout=30).json()
    routes = [(method, path) for path, ops in spec["paths"].items() for method in ops if path not in PUBLIC]
    assert ("post", "/admin/adapters") in routes and ("post", "/v1/knowledge/{kb}/ingest") in routes
    assert ("post", "/v1/files") in routes and ("delete", "/v1/files/{file_id}") in routes
    failures = []
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for kind, expected in EXPECTED.items():
            headers = {"authorization": f"Bearer {secrets[kind]}"} if kind != "none" else {}
            for method, path in routes:
                # Names that do not exist and empty bodies: allowed calls fail *after* auth (400/404), harmlessly.
                url = path.replace("{name}", "no-such-adapter").replace("{kb}", "no-such-kb")
                url = re.sub(r"\{\w+\}", "no-such-id", url)  # any other id: files, jobs
                body = {} if method in ("post", "put", "patch") else None
                response = http.request(method.upper(), url, json=body, headers=headers)
                want = expected[required_scope(method, path)]
                got = response.status_code
                ok = got not in (401, 403) and got < 500 if want == "ok" else got == want
                if not ok:
                    failures.append(f"{kind} {method.upper()} {path}: {got} (want {want}) {response.text[:120]}")
                if got >= 400:
                    assert set(response.json()["error"]) >= {"message", "type", "code"}
    assert not failures, "\n".join(failures)


@pytest.mark.engine
def test_revocation_reaches_the_running_server(keyed_server: tuple[Server, dict]) -> None:
    srv, _ = keyed_server
    created = lorag("keys", "create", "--name", "rotating", "--config", str(srv.config_path))
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    headers = {"authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/v1/models", headers=headers).status_code == 200  # a new key works at once
        revoked = lorag("keys", "revoke", "rotating", "--config", str(srv.config_path))
        assert revoked.returncode == 0, revoked.stderr
        denied = http.get("/v1/models", headers=headers)  # the very next request, no restart
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert "revoked" in denied.json()["error"]["message"]
        assert http.get("/v1/models", headers={"authorization": f"Bearer {USER_KEY}"}).status_code == 200
    assert srv.process.poll() is None
    log = srv.log_path.read_text(errors="replace")
    assert secret not in log and hash_secret(secret)[7:] not in log  # never logged


def test_serve_with_its_port_taken_says_so_in_one_line_before_starting_anything(tmp_path: Path, models: Models) -> None:
    """The port is bound before the engine's long start: taken, it is one line and exit 1 at once."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--model", str(models.base), "--port", str(port), "--state-dir", str(tmp_path / "state")]
        run = subprocess.run([sys.executable, "-m", "lorag.cli", "serve", *args], capture_output=True, text=True,
                             timeout=120)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert len(errors) == 1 and f":{port}" in errors[0] and "--port" in errors[0], run.stderr
