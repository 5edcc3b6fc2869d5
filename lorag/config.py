"""lorag.toml -> validated, typed settings.

Every part of lorag reads its settings from one file. Unknown keys are refused
(a typo must not silently fall back to a default) and every error names the
key's dotted path and what was expected.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lorag.finetune.settings import FineTuningSettings
from lorag.fleet.settings import FleetServer, FleetSettings, check_servers
from lorag.knowledge.settings import KnowledgeSettings
from lorag.lanes import LaneSettings
from lorag.loop.settings import StoredCompletionsSettings
from lorag.plugins.settings import PluginsSettings
from lorag.schema import Strict
from lorag.serving.settings import DomainSettings, RoutingSettings, check_domain_names

CONFIG_ENV = "LORAG_CONFIG"
STATE_ENV = "LORAG_STATE_DIR"


class ConfigError(Exception):
    """A lorag.toml (or flag) that cannot be used; the message is meant for a person."""


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
    # "auto": where the engine's LoRA kernels mis-handle base requests in mixed batches
    # (vLLM CPU), base requests use the null adapter once the engine's last LoRA slot may
    # hold an adapter, and go without one before (faster); "on": always. See lorag.engine.
    base_via_null_adapter: Literal["auto", "on", "off"] = "auto"
    extra: dict[str, Any] = Field(default_factory=dict, description="Passed to AsyncEngineArgs as is.")
    # "local": one vLLM engine in this process. "remote": generation goes to the vLLM OpenAI
    # servers below (docs/scale.md); lorag keeps the registry, routing and the request path.
    backend: Literal["local", "remote"] = "local"
    servers: list[FleetServer] = Field(default_factory=list)
    fleet: FleetSettings = Field(default_factory=FleetSettings)

    @model_validator(mode="after")
    def _servers_for_remote(self) -> EngineSettings:
        check_servers(self.backend, self.servers)
        return self


class ApiKey(Strict):
    """A key clients send as `Authorization: Bearer <key>`, and what it may reach.

    `hash = "sha256:<hex>"` instead of `key` keeps the secret itself out of lorag.toml.
    An admin key reaches everything, so it takes no narrower scopes; `fine_tune`, which only
    widens a key (and is off by default, unlike the others), may be set on one and changes nothing.
    """

    key: str | None = Field(default=None, min_length=8)
    hash: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$", description="sha256:<hex> of the key.")
    name: str = ""
    admin: bool = False
    domains: list[str] | None = Field(default=None, description="Domains this key may use (absent: all).")
    knowledge: bool = Field(default=True, description="May query knowledge bases directly (/v1/knowledge).")
    overrides: bool = Field(default=True, description="May override retrieval or the adapter per request.")
    fine_tune: bool = Field(default=False, description="May use files and fine-tuning (/v1/files, /v1/fine_tuning).")

    @model_validator(mode="after")
    def _one_secret_and_sane_scopes(self) -> ApiKey:
        if (self.key is None) == (self.hash is None):
            raise ValueError("set exactly one of `key` or `hash` (hash = \"sha256:<hex of the key>\")")
        ApiKey.check_scopes(self.admin, self.domains, self.knowledge, self.overrides)
        return self

    @staticmethod
    def check_scopes(admin: bool, domains: list[str] | None, knowledge: bool, overrides: bool) -> None:
        """Refuse scopes that mean nothing; the key store (lorag keys create) uses the same rule."""
        if admin and (domains is not None or not knowledge or not overrides):
            raise ValueError("an admin key has every scope; drop `domains`, `knowledge` and `overrides`, or `admin`")
        if domains is not None and any(not d.strip() for d in domains):
            raise ValueError("domain names must not be empty")

    @property
    def sha256(self) -> str:
        """`sha256:<hex>` of the key, whichever way it was configured."""
        if self.hash is not None:
            return self.hash
        return "sha256:" + hashlib.sha256((self.key or "").encode()).hexdigest()


class LimitsSettings(Strict):
    """Per-key admission limits (`[server.limits]`): what one key may take from a shared engine.

    0 switches a limit off. The token rate is a bucket per key, charged
    prompt + max_tokens per request and refilled every second.
    """

    max_messages: int = Field(default=1024, ge=0, description="Messages in one chat request.")
    max_concurrent_per_key: int = Field(default=64, ge=0, description="Requests one key may have in flight.")
    requests_per_min_per_key: int = Field(default=0, ge=0, description="Requests one key may start in any 60 s.")
    tokens_per_s_per_key: float = Field(default=0, ge=0, description="Token bucket refill per second.")
    token_burst_per_key: int = Field(default=0, ge=0, description="Token bucket size (0: 10 s of refill).")
    generation_timeout_s: float = Field(default=600, ge=0, description="One request's generation, at most.")
    backend: Literal["memory", "redis"] = Field(
        default="memory", description="Where the counts live: this process, or Redis, shared by every replica.")
    redis_url: str = Field(default="", description="redis://host:port/db or unix:///path/redis.sock (backend redis).")
    redis_timeout_s: float = Field(default=0.25, gt=0, description="Connect and answer timeout of one decision.")
    replicas: int = Field(
        default=1, ge=1,
        description="lorag replicas sharing the limits: while Redis is unreachable, each enforces 1/replicas of them.")

    @model_validator(mode="after")
    def _redis_needs_a_url(self) -> LimitsSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("server.limits.backend = \"redis\" needs server.limits.redis_url")
        return self


class ServerSettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: list[ApiKey] = Field(default_factory=list)
    max_request_bytes: int = Field(default=4 << 20, gt=0)
    cors_origins: list[str] = Field(default_factory=list)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    # SIGTERM: stop accepting, let in-flight requests (streams too) finish for this long, then exit.
    drain_timeout_s: int = Field(default=30, ge=0)
    # Processes serving one port (`lorag serve --workers N`); above 1, the remote backend only.
    workers: int = Field(default=1, ge=1, le=64)

    @field_validator("api_keys")
    @classmethod
    def _key_names_unique(cls, keys: list[ApiKey]) -> list[ApiKey]:
        # Domains grant access by key name, so one name must mean one key.
        names = [k.name for k in keys if k.name]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"key names must be unique: {', '.join(duplicates)}")
        return keys


class AdapterSettings(Strict):
    """An adapter registered at start-up (the registry keeps it across restarts too)."""

    path: str
    version: str | None = None


class AdaptersSettings(Strict):
    # Adapters may only be loaded from under these directories (besides the state dir).
    allowed_roots: list[str] = Field(default_factory=list)
    preload: dict[str, AdapterSettings] = Field(default_factory=dict)


class StateSettings(Strict):
    """`[state]`: where shared state lives. The state directory is the embedded default; with
    `backend = "postgres"` API keys, the adapter registry, stored completions and feedback, and
    fine-tuning files' and jobs' records live in PostgreSQL, their bytes under `shared_dir`,
    shared by every replica (docs/scale.md)."""

    backend: Literal["files", "postgres"] = "files"
    url: str = Field(default="", description="postgresql://user@host/db (or ?host=/socket/dir) for backend postgres.")
    shared_dir: str = Field(
        default="", description="A directory every replica mounts: adapter files, fine-tuning files and job "
                                "folders (backend postgres; default: state_dir).")

    @model_validator(mode="after")
    def _postgres_needs_a_url(self) -> StateSettings:
        if self.backend == "postgres" and not self.url:
            raise ValueError("state.backend = \"postgres\" needs state.url")
        return self


class Settings(Strict):
    state_dir: str = ".lorag"
    state: StateSettings = Field(default_factory=StateSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    adapters: AdaptersSettings = Field(default_factory=AdaptersSettings)
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings)
    plugins: PluginsSettings = Field(default_factory=PluginsSettings)
    domains: dict[str, DomainSettings] = Field(default_factory=dict)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    threads: LaneSettings = Field(default_factory=LaneSettings)
    fine_tuning: FineTuningSettings = Field(default_factory=FineTuningSettings)
    stored_completions: StoredCompletionsSettings = Field(default_factory=StoredCompletionsSettings)

    @model_validator(mode="after")
    def _imported_model_by_name(self) -> Settings:
        # `model.path = "NAME"` may name a model imported with `lorag models import`: every
        # consumer (engine, training, adapter validation) then sees the one folder path.
        from lorag.models.names import resolve_model_path

        resolved = resolve_model_path(self.model.path, self.state_path)
        if resolved != self.model.path:
            if self.model.name is None:
                self.model.name = self.model.path
            self.model.path = resolved
        return self

    @model_validator(mode="after")
    def _domains_fit_together(self) -> Settings:
        check_domain_names(self.domains, self.model.served_name)
        if self.routing.fallback is not None and self.routing.fallback not in self.domains:
            raise ValueError(f"routing.fallback: {self.routing.fallback!r} is not a domain")
        for name, domain in self.domains.items():
            if domain.plugins is None:
                continue
            # One place holds each domain's plugins: [plugins.domains.<name>] or the domain's own table.
            if name in self.plugins.domains and self.plugins.domains[name] != domain.plugins:
                raise ValueError(f"domains.{name}.plugins: also set in [plugins.domains.{name}]; keep one")
            self.plugins.domains[name] = domain.plugins
        return self

    @model_validator(mode="after")
    def _workers_need_a_fleet(self) -> Settings:
        # Each worker holds its own engine: in process, N workers would load the model N times.
        if self.server.workers > 1 and self.engine.backend != "remote":
            raise ValueError('server.workers above 1 needs [engine] backend = "remote" (vLLM servers behind lorag)')
        return self

    @field_validator("state_dir")
    @classmethod
    def _state_dir_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser().resolve()

    @property
    def shared_path(self) -> Path:
        """Where every replica finds the bytes of shared state: `[state] shared_dir`, else the state directory."""
        shared = self.state.shared_dir
        return Path(shared).expanduser().resolve() if shared else self.state_path


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
