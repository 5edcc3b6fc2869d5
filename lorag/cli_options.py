"""Options several commands share, and settings built from a config file plus flags."""

from __future__ import annotations

from typing import Any

import click

from lorag.config import AdapterSettings, ApiKey, Settings, load_settings
from lorag.errors import LoragError


def parse_adapter_flag(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter(f"expected NAME=PATH, got {value!r}", param_hint="--adapter")
    return name, path


def settings_from_flags(config: str | None, state_dir: str | None, **flags: Any) -> Settings:
    """The config file (or defaults), then flags on top."""
    overrides = {
        "state_dir": state_dir,
        "model.path": flags.get("model"),
        "model.dtype": flags.get("dtype"),
        "model.max_model_len": flags.get("max_model_len"),
        "engine.max_loras": flags.get("max_loras"),
        "engine.max_lora_rank": flags.get("max_lora_rank"),
        "server.host": flags.get("host"),
        "server.port": flags.get("port"),
    }
    settings = load_settings(config, overrides)
    for key in flags.get("api_keys") or ():
        settings.server.api_keys.append(ApiKey(key=key, name="cli", admin=True))
    for value in flags.get("adapters") or ():
        name, path = parse_adapter_flag(value)
        settings.adapters.preload[name] = AdapterSettings(path=path)
    if not settings.model.path:
        raise LoragError("No model to serve: pass --model PATH (or set model.path in lorag.toml).")
    return settings


def common_options(func: Any) -> Any:
    for option in reversed([
        click.option("--config", "-c", type=click.Path(dir_okay=False), help="lorag.toml (default: $LORAG_CONFIG or ./lorag.toml)."),
        click.option("--state-dir", help="Where lorag keeps adapters, knowledge and caches (default .lorag)."),
        click.option("--model", help="Imported model name (lorag models list), local HF checkpoint folder or HF model id."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"])),
        click.option("--max-model-len", type=int),
        click.option("--max-loras", type=int, help="Distinct adapters in one batch."),
        click.option("--max-lora-rank", type=int),
        click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="Serve this adapter (repeatable)."),
    ]):
        func = option(func)
    return func
