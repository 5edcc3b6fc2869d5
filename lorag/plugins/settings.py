"""Settings of the plugin part ([plugins] in lorag.toml).

    [plugins]
    default = ["json_schema"]          # plugins of a domain without its own table
    hook_timeout_s = 2.0
    hold_back_chars = 128
    before_routing = ["pii"]           # what an `auto` question passes before it is routed

    [plugins.settings.blocklist]       # a plugin's settings, for every domain
    terms = ["internal only"]

    [plugins.domains.legal]            # keyed by the model name clients ask for
    enabled = ["pii", "blocklist", "legal", "formatting"]
    [plugins.domains.legal.settings.formatting]
    style = "plain"

The structure is checked here; each plugin's own settings are checked against the
model its `settings_model` hook returns, when the plugins load (lorag.plugins.host).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_names(names: list[str]) -> list[str]:
    seen: set[str] = set()
    for name in names:
        if not NAME_RE.match(name):
            raise ValueError(f"{name!r} is not a plugin name (letters, digits, '_', '-', '.')")
        if name in seen:
            raise ValueError(f"{name!r} is listed twice")
        seen.add(name)
    return names


class DomainPlugins(BaseModel):
    """The plugins of one domain, in the order their hooks run."""

    model_config = ConfigDict(extra="forbid")

    enabled: list[str] = Field(default_factory=list)
    settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-plugin settings, merged over [plugins.settings.<name>]."
    )
    hold_back_chars: int | None = Field(default=None, ge=8, le=1 << 20)
    max_retries: int | None = Field(default=None, ge=0, le=10)
    hook_timeout_s: float | None = Field(default=None, gt=0, le=600)

    @field_validator("enabled")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return _check_names(value)

    @model_validator(mode="after")
    def _settings_for_enabled_plugins(self) -> DomainPlugins:
        # Settings for a plugin the domain does not enable are almost always a typo.
        stray = sorted(set(self.settings) - set(self.enabled))
        if stray:
            raise ValueError(f"settings for {', '.join(stray)}, which this domain does not enable")
        return self


class PluginsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: list[str] = Field(
        default_factory=lambda: ["json_schema"],
        description="Plugins of requests whose model has no [plugins.domains.<name>] table.",
    )
    modules: dict[str, str] = Field(
        default_factory=dict,
        description="Extra plugins, no packaging needed: name -> 'package.module' or 'path/to/file.py'.",
    )
    settings: dict[str, dict[str, Any]] = Field(default_factory=dict)
    domains: dict[str, DomainPlugins] = Field(default_factory=dict)
    hook_timeout_s: float = Field(default=2.0, gt=0, le=600)
    hold_back_chars: int = Field(default=128, ge=8, le=1 << 20)
    max_retries: int = Field(default=2, ge=0, le=10)
    before_routing: list[str] = Field(
        default_factory=lambda: ["pii"],
        description="Plugins whose request_received hooks see a `model: \"auto\"` question before it is "
                    "routed (its embedding, a Chroma query that may leave the machine); [] routes raw text.",
    )

    @field_validator("default", "before_routing")
    @classmethod
    def _default_names(cls, value: list[str]) -> list[str]:
        return _check_names(value)

    @field_validator("modules")
    @classmethod
    def _module_names(cls, value: dict[str, str]) -> dict[str, str]:
        _check_names(list(value))
        for name, module in value.items():
            if not (module.endswith(".py") or re.match(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$", module)):
                raise ValueError(f"{name}: {module!r} is neither a module like 'package.module' nor a .py file")
        return value

    def domain(self, name: str) -> DomainPlugins:
        """The domain's table, or one built from the defaults when it has none."""
        table = self.domains.get(name)
        if table is not None:
            return table
        return DomainPlugins(enabled=list(self.default))

    def plugin_settings(self, domain: str, plugin: str) -> dict[str, Any]:
        """Global settings of a plugin with the domain's keys on top (shallow merge)."""
        merged = dict(self.settings.get(plugin, {}))
        table = self.domains.get(domain)
        if table is not None:
            merged.update(table.settings.get(plugin, {}))
        return merged
