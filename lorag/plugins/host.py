"""The plugins of a server: PluginHost builds, once, each domain's plan (which implementations
run, in which order, with which validated settings); `for_request` hands out the RequestHooks
that run them (lorag.plugins.request_hooks holds the contract).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from lorag.config import ConfigError, format_validation_error
from lorag.logging import get_logger
from lorag.plugins.errors import ContentBlocked, OutputRejected, PluginError, PluginUnavailable
from lorag.plugins.hookspecs import REQUEST_HOOKS
from lorag.plugins.invoke import Impl, Invoker
from lorag.plugins.manager import LoadedPlugins, describe, impls_of, load_plugins, process_plugins
from lorag.plugins.request_hooks import DomainPlan, RequestHooks
from lorag.plugins.settings import PluginsSettings
from lorag.plugins.stream import OutputStream
from lorag.plugins.tools import Tool
from lorag.plugins.types import KnowledgeSearch, Verdict

if TYPE_CHECKING:
    from lorag.config import Settings

__all__ = [
    "ContentBlocked", "OutputRejected", "OutputStream", "PluginError", "PluginHost",
    "PluginUnavailable", "RequestHooks", "Verdict",
]

log = get_logger("lorag.plugins")

DEFAULT_PLAN = "\0default"
ROUTING_PLAN = "\0routing"


class PluginHost:
    """Loaded plugins plus one plan per configured domain (and one for the rest)."""

    def __init__(self, loaded: LoadedPlugins, settings: PluginsSettings) -> None:
        self.loaded = loaded
        self.settings = settings
        self.invoker = Invoker()
        self._models = self._settings_models()
        self._plans = self._all_plans()
        if any(not r.ok for r in loaded.records.values() if r.name in self._usable()):
            self._plans = self._all_plans()  # a settings model crashed midway: plan without it
        for name in sorted(set(settings.settings) - set(loaded.records)):
            log.warning("settings_for_unknown_plugin", plugin=name, key=f"plugins.settings.{name}")
        for name, plan in self._plans.items():
            for plugin, problem in plan.problems:
                log.warning("domain_plugin_unavailable", domain={DEFAULT_PLAN: None, ROUTING_PLAN: "auto"}.get(name, name),
                            plugin=plugin, problem=problem)

    @classmethod
    def from_settings(cls, settings: Settings, *, load: str | None = None) -> PluginHost:
        """A host over the process's plugin set; broken plugins are recorded, bad settings raise ConfigError.

        `load` (same syntax as $LORAG_LOAD_PLUGINS) loads a set of its own instead.
        """
        loaded = (process_plugins(settings.plugins.modules) if load is None
                  else load_plugins(settings.plugins.modules, load=load))
        host = cls(loaded, settings.plugins)
        log.info("plugins_loaded", plugins={name: f"{r.version} {r.status}" for name, r in loaded.records.items()})
        return host

    @property
    def records(self) -> dict[str, Any]:
        return self.loaded.records

    @property
    def tools(self) -> dict[str, Tool]:
        return self.loaded.tools

    def plan(self, domain: str) -> DomainPlan:
        return self._plans.get(domain) or self._plans[DEFAULT_PLAN]

    def domains_using(self, plugin: str) -> list[str]:
        """Configured domains that enable a plugin ("*" stands for every other domain)."""
        names = [d for d, t in self.settings.domains.items() if plugin in t.enabled]
        return names + (["*"] if plugin in self.settings.default else [])

    def for_request(self, *, request_id: str, domain: str,
                    search_knowledge: KnowledgeSearch | None = None) -> RequestHooks:
        plan = self.plan(domain)
        if plan.problems:
            plugin, problem = plan.problems[0]
            raise PluginUnavailable(
                f"The model '{domain}' cannot answer: its {problem}. "
                "Fix or reinstall the plugin, or take it out of the domain's plugins.",
                plugin=plugin,
            )
        return RequestHooks(self.invoker, plan, request_id=request_id, domain=domain,
                            search_knowledge=search_knowledge)

    # -- building plans ----------------------------------------------------------

    def before_routing(self, request_id: str) -> RequestHooks:
        """The hooks an `auto` question passes before it is routed (`plugins.before_routing`, with
        their global settings). Fails closed: a listed plugin that cannot run refuses the request."""
        plan = self._plans[ROUTING_PLAN]
        if plan.problems:
            plugin, problem = plan.problems[0]
            raise PluginUnavailable(f"'auto' cannot route: its {problem} (plugins.before_routing).", plugin=plugin)
        return RequestHooks(self.invoker, plan, request_id=request_id, domain="auto")

    def _all_plans(self) -> dict[str, DomainPlan]:
        plans = {name: self._plan(name, table.enabled) for name, table in self.settings.domains.items()}
        plans[DEFAULT_PLAN] = self._plan(None, self.settings.default)
        plans[ROUTING_PLAN] = self._plan(None, self.settings.before_routing)
        return plans

    def _usable(self) -> set[str]:
        return {name for plan in self._plans.values() for name in plan.plugins}

    def _settings_models(self) -> dict[str, type[BaseModel] | None]:
        models: dict[str, type[BaseModel] | None] = {}
        for name, record in list(self.loaded.records.items()):
            if not record.ok:
                continue
            try:
                found = [impl.function() for impl in impls_of(self.loaded.pm, "settings_model", name)]
                model = next((m for m in found if m is not None), None)
                if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
                    raise TypeError(f"settings_model returned {model!r}, not a pydantic model class")
                models[name] = model
            except Exception as err:
                self.loaded.mark_broken(name, f"settings_model failed: {describe(err)}")
        return models

    def _validated_settings(self, domain: str | None, plugin: str) -> Any:
        raw = self.settings.plugin_settings(domain or "", plugin)
        model = self._models.get(plugin)
        if model is None:
            return raw
        try:
            return model.model_validate(raw)
        except ValidationError as err:
            where = (f"plugins.domains.{domain}.settings.{plugin} over plugins.settings.{plugin}"
                     if domain and plugin in self.settings.domains[domain].settings
                     else f"plugins.settings.{plugin}")
            raise ConfigError(format_validation_error(err, where)) from None
        except Exception as err:  # the plugin's own validator crashed: its fault, not the config's
            self.loaded.mark_broken(plugin, f"settings_model validation crashed: {describe(err)}")
            return None

    def _plan(self, domain: str | None, enabled: list[str]) -> DomainPlan:
        table = self.settings.domains.get(domain) if domain else None
        problems: list[tuple[str, str]] = []
        settings: dict[str, Any] = {}
        usable: list[str] = []
        for name in enabled:
            record = self.loaded.records.get(name)
            if record is None:
                problems.append((name, f"plugin '{name}' is not installed"))
            elif not record.ok:
                problems.append((name, record.problem()))
            else:
                value = self._validated_settings(domain, name)
                if not record.ok:  # its settings model crashed just now
                    problems.append((name, record.problem()))
                    continue
                settings[name] = value
                usable.append(name)
        hooks = {hook: self._ordered_impls(hook, usable) for hook in REQUEST_HOOKS}
        hold_back = (table.hold_back_chars if table and table.hold_back_chars else None) \
            or self.settings.hold_back_chars
        for value in settings.values():  # a settings model may need a longer window
            hold_back = max(hold_back, int(getattr(value, "min_hold_back_chars", 0) or 0))
        # A plugin's tools are offered where the plugin is enabled; lorag's own (built-in) ones everywhere.
        tools = [t for t in self.loaded.tools.values()
                 if t.plugin in usable or self.loaded.records[t.plugin].source == "builtin"]
        return DomainPlan(
            plugins=tuple(usable),
            settings=settings,
            hooks=hooks,
            problems=problems,
            hold_back=hold_back,
            max_retries=table.max_retries if table and table.max_retries is not None
            else self.settings.max_retries,
            timeout=table.hook_timeout_s if table and table.hook_timeout_s else self.settings.hook_timeout_s,
            tools=tools,
        )

    def _ordered_impls(self, hook: str, plugins: list[str]) -> tuple[Impl, ...]:
        """The domain's order; tryfirst/trylast move an implementation to the front/back."""
        found: list[tuple[int, int, Impl]] = []
        for position, name in enumerate(plugins):
            builtin = self.loaded.records[name].source == "builtin"
            for impl in impls_of(self.loaded.pm, hook, name):
                rank = -1 if impl.tryfirst else (1 if impl.trylast else 0)
                found.append((rank, position, Impl(name, hook, impl.function, tuple(impl.argnames), builtin)))
        return tuple(impl for _, _, impl in sorted(found, key=lambda item: item[:2]))
