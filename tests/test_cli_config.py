"""Configuration validation and the CLI as a person uses it (real subprocesses, exit codes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorag.config import ConfigError, load_settings
from tests.conftest import ADMIN_KEY, Models, Server


def lorag(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
          stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorag.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, input=stdin, timeout=300)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("toml, expected", [
    ("[model]\npaht = 'x'\n", "model.paht: unknown key"),
    ("[engine]\nmax_loras = 0\n", "engine.max_loras: Input should be greater than or equal to 1"),
    ("[engine]\nmax_loras = 'many'\n", "engine.max_loras: Input should be a valid integer"),
    ("[server]\nport = 70000\n", "server.port"),
    ("[server]\napi_keys = [{ key = 'short' }]\n", "server.api_keys.0.key"),
    ("[model]\ndtype = 'int3'\n", "model.dtype"),
    ("[model\n", "not valid TOML"),
])
def test_wrong_keys_and_values_name_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    config = write(tmp_path / "lorag.toml", toml)
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert expected in str(err.value)
    assert str(config) in str(err.value)


def test_flags_override_the_file_and_env_selects_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "x.toml", "[model]\npath = 'from-file'\n[engine]\nmax_loras = 3\n")
    monkeypatch.setenv("LORAG_CONFIG", str(config))
    settings = load_settings(None, {"model.path": "from-flag", "engine.max_lora_rank": 32})
    assert settings.model.path == "from-flag"
    assert settings.engine.max_loras == 3 and settings.engine.max_lora_rank == 32


def test_serve_errors_are_one_readable_line(tmp_path: Path) -> None:
    result = lorag("serve", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: No model to serve: pass --model PATH (or set model.path in lorag.toml)."
    bad = write(tmp_path / "bad.toml", "[engine]\nmax_lorass = 2\n")
    result = lorag("serve", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and "engine.max_lorass: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    result = lorag("serve", "--model", "m", "--adapter", "no-equals-sign", cwd=tmp_path)
    assert result.returncode != 0 and "NAME=PATH" in result.stderr


def test_help_on_every_command() -> None:
    for args in ([], ["serve"], ["chat"], ["adapters"], ["adapters", "add"], ["adapters", "list"],
                 ["adapters", "remove"], ["demo"]):
        result = lorag(*args, "--help")
        assert result.returncode == 0 and "Usage:" in result.stdout, args


def test_adapters_cli_offline_registry(models: Models, tmp_path: Path) -> None:
    common = ["adapters", "--state-dir", str(tmp_path / "state"), "--model", str(models.base),
              "--offline"]
    added = lorag(*common, "add", "legal", str(models.adapters["alpha"]), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert "registered legal@v1" in added.stdout
    assert lorag(*common, "add", "legal", str(models.adapters["beta"]), cwd=tmp_path).returncode == 0
    listing = json.loads(lorag(*common, "list", "--json", cwd=tmp_path).stdout)
    assert [(r["version"], r["current"]) for r in listing] == [("v1", False), ("v2", True)]
    refused = lorag(*common, "add", "bad", str(tmp_path), cwd=tmp_path)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and "adapter_config.json" in refused.stderr
    assert lorag(*common, "activate", "legal", "v1", cwd=tmp_path).returncode == 0
    assert lorag(*common, "remove", "legal@v2", cwd=tmp_path).stdout.strip() == "removed legal@v2"
    shown = json.loads(lorag(*common, "show", "legal", cwd=tmp_path).stdout)
    assert shown["current"] == "v1" and len(shown["versions"]) == 1
    missing = lorag(*common, "show", "nope", cwd=tmp_path)
    assert missing.returncode == 1 and "No adapter named 'nope'" in missing.stderr


def test_adapters_cli_acts_live_on_a_running_server(models: Models, server: Server) -> None:
    env = {"LORAG_SERVER": server.url, "LORAG_API_KEY": ADMIN_KEY}
    added = lorag("adapters", "add", "cli-live", str(models.adapters["delta"]), env=env)
    assert added.returncode == 0, added.stderr
    answer = lorag("chat", "--server", server.url, "--api-key", ADMIN_KEY, "-m", "cli-live", "--max-tokens", "8",
                   "hello")
    assert answer.returncode == 0 and answer.stdout.strip()
    listing = json.loads(lorag("adapters", "list", "--json", env=env).stdout)
    assert "cli-live" in {r["name"] for r in listing}
    assert lorag("adapters", "remove", "cli-live", env=env).returncode == 0
    gone = lorag("chat", "--server", server.url, "--api-key", ADMIN_KEY, "-m", "cli-live", "hello")
    assert gone.returncode == 1 and "does not exist" in gone.stderr
    denied = lorag("adapters", "list", env={"LORAG_SERVER": server.url, "LORAG_API_KEY": "sk-user-test-key"})
    assert denied.returncode == 1 and "admin API key" in denied.stderr


def test_chat_interactive_loop_keeps_history(server: Server) -> None:
    result = lorag("chat", "--server", server.url, "--api-key", ADMIN_KEY, "-m", "alpha", "--max-tokens", "4",
                   stdin="first question\nsecond question\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.strip()]) >= 2
