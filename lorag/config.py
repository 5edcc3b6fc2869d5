"""lorag.toml -> validated, typed settings.

Every part of lorag reads its settings from one file. Unknown keys are refused
(a typo must not silently fall back to a default) and every error names the
key's dotted path and what was expected.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorag.knowledge.settings import KnowledgeSettings
from lorag.plugins.settings import PluginsSettings

CONFIG_ENV = "LORAG_CONFIG"
STATE_ENV = "LORAG_STATE_DIR"


class ConfigError(Exception):
    """A lorag.toml (or flag) that cannot be used; the message is meant for a person."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(Strict):
    path: str = Field(default="", description="Local HF checkpoint directory or HF model id.")
    name: str | None = Field(default=None, description="Name served on /v1/models (default: path).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = Field(default=None, gt=0)
    tokenizer: str | None = None
    trust_remote_code: bool = False

    @property
    def served_name(self) -> str:
        return self.name or self.path


class EngineSettings(Strict):
    """The vLLM engine arguments lorag sets itself; anything else goes in `extra`."""

    max_loras: int = Field(default=4, ge=1)
    max_lora_rank: int = Field(default=16, ge=1)
    max_cpu_loras: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    kv_cache_memory_bytes: int | None = Field(default=None, gt=0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    enforce_eager: bool | None = None
    seed: int = 0
    # "auto": on where the engine's LoRA kernels mis-handle base requests in mixed
    # batches (vLLM CPU); see lorag.runtime.engine.
    base_via_null_adapter: Literal["auto", "on", "off"] = "auto"
    extra: dict[str, Any] = Field(default_factory=dict, description="Passed to AsyncEngineArgs as is.")


class ApiKey(Strict):
    key: str = Field(min_length=8)
    name: str = ""
    admin: bool = False


class ServerSettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: list[ApiKey] = Field(default_factory=list)
    max_request_bytes: int = Field(default=4 << 20, gt=0)
    cors_origins: list[str] = Field(default_factory=list)


class AdapterSettings(Strict):
    """An adapter registered at start-up (the registry keeps it across restarts too)."""

    path: str
    version: str | None = None


class AdaptersSettings(Strict):
    # Adapters may only be loaded from under these directories (besides the state dir).
    allowed_roots: list[str] = Field(default_factory=list)
    preload: dict[str, AdapterSettings] = Field(default_factory=dict)


class Settings(Strict):
    state_dir: str = ".lorag"
    model: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    adapters: AdaptersSettings = Field(default_factory=AdaptersSettings)
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings)
    plugins: PluginsSettings = Field(default_factory=PluginsSettings)
    domains: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("state_dir")
    @classmethod
    def _state_dir_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser().resolve()


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `source: key.path: what was expected`."""
    lines = []
    for problem in err.errors():
        path = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{source}: {path}: {message}")
    return "\n".join(lines)


def find_config_path(explicit: str | None) -> Path | None:
    """The flag wins, then $LORAG_CONFIG, then ./lorag.toml if present."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = Path("lorag.toml")
    return default if default.exists() else None


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read and validate settings; `overrides` (from CLI flags) are merged on top by dotted key."""
    data: dict[str, Any] = {}
    source = "defaults"
    config_path = find_config_path(str(path) if path else None)
    if config_path is not None:
        source = str(config_path)
        try:
            data = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{config_path}: no such config file") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{config_path}: not valid TOML: {err}") from None
    if os.environ.get(STATE_ENV) and "state_dir" not in (overrides or {}):
        data["state_dir"] = os.environ[STATE_ENV]
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
