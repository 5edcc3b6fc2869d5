"""Loading plugins: entry points, LORAG_LOAD_PLUGINS, broken plugins, settings, `lorag plugins list`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import lorag
from lorag.plugins import hookimpl
from lorag.plugins.errors import PluginError, PluginUnavailable
from lorag.plugins.manager import LOAD_ENV, load_plugins, parse_load_env
from lorag.plugins.settings import PluginsSettings
from tests.plugins.host import HERE, ROOT, hooks_for, install_example_plugin, make_host, run_stream


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Install examples/lorag-plugin-legal; returns the env a subprocess needs to see it."""
    target = install_example_plugin(tmp_path_factory.mktemp("site"))
    env = {**os.environ}
    if target is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), str(ROOT), env.get("PYTHONPATH")]))
    env.pop(LOAD_ENV, None)
    return env


def module(name: str) -> str:
    return str(HERE / f"{name}.py")


# -- loading --------------------------------------------------------------------------


def test_builtins_are_plugins_too() -> None:
    loaded = load_plugins(load="")
    for name in ("pii", "blocklist", "json_schema", "formatting"):
        record = loaded.records[name]
        assert (record.ok, record.source, record.version) == (True, "builtin", lorag.__version__)
        assert "settings_model" in record.hooks


def test_parse_load_env() -> None:
    assert parse_load_env(None) is None and parse_load_env("all") is None
    assert parse_load_env("") == set() and parse_load_env(" , ") == set()
    assert parse_load_env("legal, lorag_plugin_x") == {"legal", "lorag-plugin-x"}


def test_example_plugin_loads_from_its_entry_point(example_plugin: dict[str, str]) -> None:
    loaded = load_plugins(load=None, use_env=False)
    record = loaded.records["legal"]
    assert (record.status, record.source, record.distribution, record.version) == \
        ("ok", "entry point", "lorag-plugin-legal", "0.1.0")
    assert set(record.hooks) == {"format_output", "output_complete", "register_commands",
                                 "register_knowledge_readers", "register_tools", "request_received",
                                 "settings_model"}
    assert loaded.tools["limitation_period"].plugin == "legal"
    assert loaded.knowledge_readers[".statute"][0] == "legal"


@pytest.mark.parametrize("value", ["legal", "lorag-plugin-legal", "LORAG_PLUGIN_LEGAL"])
def test_env_var_selects_plugins_by_entry_point_or_distribution(example_plugin, value: str) -> None:
    assert load_plugins(load=value).records["legal"].ok


def test_env_var_disables_the_example_plugin(example_plugin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOAD_ENV, "")
    host = make_host(load=None, domains={"legal": {"enabled": ["legal"]}, "other": {"enabled": ["pii"]}})
    record = host.records["legal"]
    assert record.status == "not loaded" and "limitation_period" not in host.tools
    with pytest.raises(PluginUnavailable, match=r"'legal' is installed but not loaded \(LORAG_LOAD_PLUGINS=''\)"):
        hooks_for(host, "legal")
    hooks_for(host, "other").request_received([])  # other domains keep working


def test_env_var_naming_a_missing_plugin_is_reported() -> None:
    record = load_plugins(load="lorag-plugin-nope").records["lorag-plugin-nope"]
    assert record.status == "broken" and "no installed package provides it" in (record.error or "")


# -- broken plugins -----------------------------------------------------------------


def test_import_error_is_recorded_and_only_its_domains_fail() -> None:
    host = make_host(modules={"broken": module("broken_import")},
                     domains={"uses_it": {"enabled": ["pii", "broken"]}, "fine": {"enabled": ["pii"]}})
    record = host.records["broken"]
    assert record.status == "broken"
    assert record.error == "import failed: ModuleNotFoundError: No module named 'lorag_module_that_does_not_exist'"
    with pytest.raises(PluginUnavailable) as err:
        hooks_for(host, "uses_it")
    assert err.value.status_code == 503 and err.value.plugin == "broken"
    assert "plugin 'broken' failed to load: import failed: ModuleNotFoundError" in err.value.message
    assert hooks_for(host, "fine").request_received([{"role": "user", "content": "a@example.com"}]) == \
        [{"role": "user", "content": "[EMAIL_1]"}]


def test_ctrl_c_during_a_plugin_import_is_not_swallowed(tmp_path: Path) -> None:
    """A plugin that exits at import is broken; a Ctrl-C meanwhile is the user's, and stops the load."""
    exits = tmp_path / "exits.py"
    exits.write_text("raise SystemExit(3)\n")
    assert make_host(modules={"exits": str(exits)}).records["exits"].status == "broken"
    interrupted = tmp_path / "interrupted.py"
    interrupted.write_text("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        make_host(modules={"interrupted": str(interrupted)})


def test_unknown_plugin_name_in_a_domain() -> None:
    host = make_host(domains={"d": {"enabled": ["pii", "not-installed"]}})
    with pytest.raises(PluginUnavailable, match="plugin 'not-installed' is not installed"):
        hooks_for(host, "d")


def test_typo_in_a_hook_name_marks_the_plugin_broken() -> None:
    class Typo:
        @hookimpl
        def request_recieved(self, messages: list) -> None:
            pass

    host = make_host({"typo": Typo()})
    assert host.records["typo"].error == "implements 'request_recieved', which is not a lorag hook (a typo?)"


def test_wrong_argument_name_and_wrapper_are_refused() -> None:
    class WrongArg:
        @hookimpl
        def request_received(self, msgs: list) -> None:
            pass

    class Wrapper:
        @hookimpl(wrapper=True)
        def output_complete(self, text: str) -> Any:
            return (yield)

    host = make_host({"wrongarg": WrongArg(), "wrapper": Wrapper()})
    assert "msgs" in (host.records["wrongarg"].error or "")
    assert "cannot be a wrapper" in (host.records["wrapper"].error or "")


def test_exception_in_a_registration_hook_marks_the_plugin_broken() -> None:
    class BadTools:
        @hookimpl
        def register_tools(self, register: Any) -> None:
            raise RuntimeError("tool shed on fire")

    host = make_host({"badtools": BadTools()}, domains={"d": {"enabled": ["badtools"]}})
    assert host.records["badtools"].error == "register hook failed: RuntimeError: tool shed on fire"
    with pytest.raises(PluginUnavailable):
        hooks_for(host, "d")


def test_crash_in_a_settings_validator_marks_the_plugin_broken() -> None:
    from pydantic import BaseModel, field_validator

    class Fragile(BaseModel):
        level: int = 0

        @field_validator("level")
        @classmethod
        def _check(cls, value: int) -> int:
            if value > 1:
                raise TypeError("validator bug")  # not a ValueError: pydantic lets it through
            return value

    class WithFragile:
        @hookimpl
        def settings_model(self) -> type[BaseModel]:
            return Fragile

        @hookimpl
        def request_received(self) -> None:
            pass

    host = make_host({"fragile": WithFragile()}, domains={
        "calm": {"enabled": ["fragile"]},
        "loud": {"enabled": ["fragile"], "settings": {"fragile": {"level": 5}}},
        "other": {"enabled": ["pii"]}})
    assert "settings_model validation crashed: TypeError: validator bug" in (host.records["fragile"].error or "")
    for domain in ("calm", "loud"):
        with pytest.raises(PluginUnavailable):
            hooks_for(host, domain)
    hooks_for(host, "other").request_received([])


def test_exception_in_a_filter_blocks_never_leaks() -> None:
    host = make_host(modules={"crashing": module("crashing")}, domains={"d": {"enabled": ["crashing"]}},
                     hold_back_chars=8)
    for chunks in (["secret text that must not leak"], list("secret text that must not leak")):
        sent, blocked = run_stream(hooks_for(host, "d"), chunks)
        assert sent == "" and blocked is not None
        assert blocked.startswith("Plugin 'crashing' failed in output_chunk: RuntimeError: filter exploded")


def test_exception_in_an_input_hook_refuses_the_request() -> None:
    class Crash:
        @hookimpl
        def request_received(self) -> None:
            raise KeyError("missing")

    host = make_host({"crash": Crash()}, default=["crash"])
    with pytest.raises(PluginError) as err:
        hooks_for(host).request_received([])
    assert err.value.status_code == 500 and err.value.plugin == "crash" and err.value.hook == "request_received"
    assert "Plugin 'crash' failed in request_received: KeyError" in err.value.message


def test_slow_hook_times_out_and_other_domains_keep_working() -> None:
    host = make_host(modules={"slow": module("slow")}, settings={"slow": {"seconds": 5}},
                     domains={"slow": {"enabled": ["slow"], "hook_timeout_s": 0.3}, "fast": {"enabled": ["pii"]}})
    failures: list[BaseException] = []

    def slow_request() -> None:
        try:
            hooks_for(host, "slow").request_received([])
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            failures.append(err)

    started = time.perf_counter()
    thread = threading.Thread(target=slow_request)
    thread.start()
    assert hooks_for(host, "fast").request_received([{"role": "user", "content": "hi"}])
    thread.join()
    assert time.perf_counter() - started < 2
    assert len(failures) == 1 and isinstance(failures[0], PluginError)
    assert "Plugin 'slow' did not finish request_received within 0.3 s" in str(failures[0])


def test_a_crashing_validator_refuses() -> None:
    class BadValidator:
        @hookimpl
        def output_complete(self) -> None:
            raise ZeroDivisionError("oops")

    host = make_host({"bad": BadValidator()}, default=["bad"])
    verdict = hooks_for(host).output_complete("text")
    assert verdict.action == "refuse" and "Plugin 'bad' failed in output_complete" in (verdict.message or "")


# -- settings -------------------------------------------------------------------------


def test_settings_structure_is_validated() -> None:
    with pytest.raises(ValidationError, match="settings for formatting, which this domain does not enable"):
        PluginsSettings.model_validate({"domains": {"d": {"enabled": ["pii"], "settings": {"formatting": {}}}}})
    with pytest.raises(ValidationError, match="'pii' is listed twice"):
        PluginsSettings.model_validate({"default": ["pii", "pii"]})
    with pytest.raises(ValidationError, match="neither a module"):
        PluginsSettings.model_validate({"modules": {"x": "not a module"}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        PluginsSettings.model_validate({"domains": {"d": {"enabeld": ["pii"]}}})


# -- the example plugin and the CLI ----------------------------------------------------


def test_example_plugin_validator_formatter_and_tool(example_plugin) -> None:
    host = make_host(load="legal", domains={"legal": {"enabled": ["legal"],
                                                      "settings": {"legal": {"jurisdiction": "US-NY"}}}})
    hooks = hooks_for(host, "legal")
    hooks.request_received([{"role": "user", "content": "Will I win?"}])
    assert hooks.holds_output
    stream = hooks.output_stream()
    assert stream.feed("Yes, you will WIN. ") == ""
    stream.finish()
    verdict = hooks.output_complete(stream.text)
    assert verdict.action == "retry" and "Do not promise outcomes" in (verdict.message or "")
    hooks.output_stream()
    assert hooks.output_complete("It depends on the evidence.").action == "pass"
    text, response = hooks.format("It depends.", {}, [])
    assert text == "It depends.\n\n---\n_This is general legal information, not legal advice. (US-NY)_"
    assert response["lorag"]["legal"] == {"jurisdiction": "US-NY", "disclaimer": True}
    tool = next(t for t in hooks.tools if t.plugin == "legal")  # built-in tools are offered too
    assert tool.parameters["properties"]["claim"]["enum"][0] == "personal_injury"
    assert tool.call({"claim": "written_contract", "jurisdiction": "US-NY"})["years"] == 6


def lorag_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorag.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_plugin_command_and_plugins_list(example_plugin, tmp_path: Path) -> None:
    config = tmp_path / "lorag.toml"
    config.write_text(f"""
[plugins]
default = ["json_schema", "pii"]
modules = {{ broken = "{module('broken_import')}" }}
[plugins.domains.legal]
enabled = ["pii", "legal"]
""")
    result = lorag_cli(["legal", "limitation", "written_contract", "-j", "US-NY"], example_plugin, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "written_contract in US-NY: 6 years (N.Y. CPLR § 213)\n"

    result = lorag_cli(["plugins", "list", "--config", str(config), "--json"], example_plugin, tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["legal"]["version"] == "0.1.0" and rows["legal"]["source"] == "lorag-plugin-legal"
    assert rows["legal"]["domains"] == ["legal"] and rows["legal"]["tools"] == ["limitation_period"]
    assert rows["pii"]["domains"] == ["legal", "*"] and "output_chunk" in rows["pii"]["hooks"]
    assert rows["broken"]["status"] == "broken" and "ModuleNotFoundError" in rows["broken"]["error"]

    result = lorag_cli(["plugins", "list", "--config", str(config)], {**example_plugin, LOAD_ENV: ""}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "not loaded: LORAG_LOAD_PLUGINS=''" in result.stdout
    assert "broken: import failed: ModuleNotFoundError" in result.stdout


def test_cli_bad_plugin_settings_is_one_readable_line(tmp_path: Path) -> None:
    config = tmp_path / "lorag.toml"
    config.write_text('[plugins.settings.formatting]\nstyle = "html"\n[plugins]\ndefault = ["formatting"]\n')
    result = lorag_cli(["plugins", "list", "--config", str(config)], dict(os.environ), tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: plugins.settings.formatting: style: Input should be")
