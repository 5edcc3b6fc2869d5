"""Options several commands share, and settings built from a config file plus flags.

`-c/--config` and `--state-dir` work the same way on every command group and on each of its
commands: `lorag kb -c X ingest ...` and `lorag kb ingest -c X ...` are the same (the later
one wins). They are remembered in the click context; `cli_settings()` reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from pydantic import ValidationError

from lorag.config import AdapterSettings, ApiKey, Settings, load_settings

SERVER_ENV = "LORAG_SERVER"  # a running server's URL, for commands that can talk to one
API_KEY_ENV = "LORAG_API_KEY"
CONFIG_KEY = "lorag.config"
STATE_DIR_KEY = "lorag.state_dir"


def _remember(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.meta[key] = value  # meta is shared by the whole command line's contexts
        return value

    return callback


def config_options(func: Any) -> Any:
    """-c/--config and --state-dir, for a group or a command."""
    func = click.option("--state-dir", expose_value=False, callback=_remember(STATE_DIR_KEY),
                        help="Where lorag keeps models, adapters, knowledge and keys (default: from the "
                             "config, or .lorag).")(func)
    return click.option("--config", "-c", type=click.Path(dir_okay=False), expose_value=False,
                        callback=_remember(CONFIG_KEY),
                        help="lorag.toml (default: $LORAG_CONFIG or ./lorag.toml).")(func)


def chosen_config() -> tuple[str | None, str | None]:
    """(config file, state dir) given anywhere on this command line, or (None, None)."""
    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    return meta.get(CONFIG_KEY), meta.get(STATE_DIR_KEY)


def cli_settings(**overrides: Any) -> Settings:
    """Settings from the chosen config file and state dir, with `overrides` (dotted keys) on top."""
    config, state_dir = chosen_config()
    return load_settings(config, {"state_dir": state_dir, **overrides})


def parse_adapter_flag(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter(f"expected NAME=PATH, got {value!r}", param_hint="--adapter")
    return name, path


def settings_from_flags(**flags: Any) -> Settings:
    """The chosen config file (or defaults), then the state dir and the other flags on top."""
    config, state_dir = chosen_config()
    overrides = {
        "state_dir": state_dir,
        "model.path": flags.get("model"),
        "model.dtype": flags.get("dtype"),
        "model.max_model_len": flags.get("max_model_len"),
        "engine.max_loras": flags.get("max_loras"),
        "engine.max_lora_rank": flags.get("max_lora_rank"),
        "server.host": flags.get("host"),
        "server.port": flags.get("port"),
        "server.workers": flags.get("workers"),
    }
    settings = load_settings(config, overrides)
    for key in flags.get("api_keys") or ():
        settings.server.api_keys.append(_api_key(key))
    for value in flags.get("adapters") or ():
        name, path = parse_adapter_flag(value)
        settings.adapters.preload[name] = AdapterSettings(path=path)
    if not settings.model.path:
        raise click.UsageError("No model to serve: pass --model PATH (or set model.path in lorag.toml).")
    return settings


def _api_key(key: str) -> ApiKey:
    """An admin key given with --api-key; a bad one is a usage error naming the flag (exit 2)."""
    try:
        return ApiKey(key=key, name="cli", admin=True)
    except ValidationError as err:
        reason = "; ".join(str(e["msg"]) for e in err.errors())
        raise click.BadParameter(reason, param_hint="--api-key") from None


def common_options(func: Any) -> Any:
    for option in reversed([
        click.option("--model", help="Imported model name (lorag models list), local HF checkpoint folder or HF model id."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"])),
        click.option("--max-model-len", type=int),
        click.option("--max-loras", type=int, help="Distinct adapters in one batch."),
        click.option("--max-lora-rank", type=int),
        click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="Serve this adapter (repeatable)."),
    ]):
        func = option(func)
    return config_options(func)
