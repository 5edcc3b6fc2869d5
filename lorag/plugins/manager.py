"""Finding and loading plugins: built-ins, the `lorag` entry point group, and modules.

Built-ins are plugins like any other (registered under short names). Installed
packages plug in through the entry point group `lorag`; $LORAG_LOAD_PLUGINS
chooses which of them load, as LLM_LOAD_PLUGINS does for llm:

    unset        every installed plugin
    ""           none (built-ins only)
    "a,b"        only these (entry point or distribution names)

Loading never raises: a plugin that fails to import, clashes with another name,
implements a hook that does not exist (a typo) or crashes in a registration hook is
recorded with the reason, and the others load as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from typing import Any, Literal

import pluggy

from lorag import __version__
from lorag.logging import get_logger
from lorag.plugins import hookspecs
from lorag.plugins.tools import Tool, tool_from_function

log = get_logger("lorag.plugins")

ENTRY_POINT_GROUP = "lorag"
LOAD_ENV = "LORAG_LOAD_PLUGINS"

BUILTIN_PLUGINS: dict[str, str] = {
    "pii": "lorag.plugins.builtin.pii",
    "blocklist": "lorag.plugins.builtin.blocklist",
    "json_schema": "lorag.plugins.builtin.json_schema",
    "formatting": "lorag.plugins.builtin.formatting",
    "file_readers": "lorag.plugins.builtin.file_readers",
    "knowledge_search": "lorag.plugins.builtin.knowledge_search",
}

Source = Literal["builtin", "entry point", "module"]
Status = Literal["ok", "broken", "not loaded"]


@dataclass
class PluginRecord:
    """One plugin as `lorag plugins list` shows it."""

    name: str
    source: Source
    target: str  # module path or entry point value
    version: str = ""
    distribution: str | None = None
    status: Status = "ok"
    error: str | None = None
    hooks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def problem(self) -> str:
        """Why a domain cannot use this plugin, as one sentence."""
        if self.status == "not loaded":
            return f"plugin '{self.name}' is installed but not loaded ({self.error})"
        return f"plugin '{self.name}' failed to load: {self.error}"


@dataclass
class LoadedPlugins:
    pm: pluggy.PluginManager
    records: dict[str, PluginRecord]
    tools: dict[str, Tool] = field(default_factory=dict)
    knowledge_readers: dict[str, tuple[str, Any]] = field(default_factory=dict)

    def plugin(self, name: str) -> Any | None:
        return self.pm.get_plugin(name)

    def mark_broken(self, name: str, error: str) -> None:
        """Take a plugin out of service: unregister it and drop what it registered."""
        record = self.records[name]
        record.status, record.error = "broken", error
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.tools = {k: t for k, t in self.tools.items() if t.plugin != name}
        self.knowledge_readers = {k: v for k, v in self.knowledge_readers.items() if v[0] != name}
        log.error("plugin_broken", plugin=name, error=error)


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_load_env(value: str | None) -> set[str] | None:
    """None: load every installed plugin; a set: only these (normalised names)."""
    if value is None or value.strip().lower() in ("all", "*"):
        return None
    return {_normal(part.strip()) for part in value.split(",") if part.strip()}


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def load_plugins(modules: dict[str, str] | None = None, *, load: str | None = None,
                 use_env: bool = True) -> LoadedPlugins:
    """Register built-ins, then selected entry points, then `modules` (name -> module path)."""
    if use_env and load is None:
        load = os.environ.get(LOAD_ENV)
    selected = parse_load_env(load)
    loaded = LoadedPlugins(pm=new_plugin_manager(), records={})

    for name, module_path in BUILTIN_PLUGINS.items():
        record = PluginRecord(name, "builtin", module_path, version=__version__, distribution="lorag")
        _register(loaded, record, partial(importlib.import_module, module_path))

    wanted = set(selected) if selected is not None else set()
    for dist, ep in _entry_points():
        dist_name = dist.metadata["Name"] or ""
        record = PluginRecord(ep.name, "entry point", ep.value, version=dist.version, distribution=dist_name)
        if selected is not None and not {_normal(ep.name), _normal(dist_name)} & selected:
            record.status, record.error = "not loaded", f"{LOAD_ENV}={load!r}"
            loaded.records.setdefault(ep.name, record)
            continue
        wanted -= {_normal(ep.name), _normal(dist_name)}
        _register(loaded, record, ep.load)
    for missing in sorted(wanted):
        loaded.records.setdefault(missing, PluginRecord(
            missing, "entry point", "", status="broken",
            error=f"listed in {LOAD_ENV} but no installed package provides it"))

    for name, module_path in (modules or {}).items():
        _register(loaded, PluginRecord(name, "module", module_path), partial(import_module, name, module_path))

    _collect_registrations(loaded)
    return loaded


def import_module(name: str, path: str) -> Any:
    """'package.module', or a .py file loaded as module `lorag_plugin_<name>`."""
    if not path.endswith(".py"):
        return importlib.import_module(path)
    module_name = "lorag_plugin_" + re.sub(r"\W", "_", name)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def add_plugin(loaded: LoadedPlugins, name: str, plugin: Any) -> PluginRecord:
    """Register an object (a module, a class instance) as a plugin, e.g. from a test."""
    record = PluginRecord(name, "module", repr(plugin))
    _register(loaded, record, lambda: plugin)
    if record.ok:
        _collect_registrations(loaded, only=name)
    return record


def _entry_points() -> list[tuple[metadata.Distribution, metadata.EntryPoint]]:
    found = []
    seen: set[tuple[str, str]] = set()
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            key = (ep.name, ep.value)
            if ep.group == ENTRY_POINT_GROUP and key not in seen:  # a dist can be on sys.path twice
                seen.add(key)
                found.append((dist, ep))
    return sorted(found, key=lambda pair: pair[1].name)


def _register(loaded: LoadedPlugins, record: PluginRecord, importer: Callable[[], Any]) -> None:
    """Import and register one plugin; on any failure record why and carry on."""
    if record.name in loaded.records and loaded.records[record.name].ok:
        other = loaded.records[record.name]
        record.status, record.error = "broken", f"the name is already taken by {other.target}"
        loaded.records[f"{record.name} ({record.target})"] = record
        log.error("plugin_broken", plugin=record.name, error=record.error)
        return
    loaded.records[record.name] = record
    try:
        plugin = importer()
    except (Exception, SystemExit) as err:  # a plugin that exits at import is broken; Ctrl-C is the user's
        record.status, record.error = "broken", f"import failed: {describe(err)}"
        log.error("plugin_broken", plugin=record.name, error=record.error)
        return
    if record.source == "module" and not record.version:
        record.version = str(getattr(plugin, "__version__", ""))
    try:
        loaded.pm.register(plugin, name=record.name)
    except Exception as err:  # pluggy.PluginValidationError: argument names not in the spec
        record.status, record.error = "broken", describe(err)
        log.error("plugin_broken", plugin=record.name, error=record.error)
        return
    problem = _check_impls(loaded.pm, plugin)
    if problem:
        loaded.pm.unregister(plugin)
        record.status, record.error = "broken", problem
        log.error("plugin_broken", plugin=record.name, error=problem)
        return
    record.hooks = sorted(caller.name for caller in loaded.pm.get_hookcallers(plugin) or [])
    log.debug("plugin_loaded", plugin=record.name, source=record.source, hooks=record.hooks)


def _check_impls(pm: pluggy.PluginManager, plugin: Any) -> str | None:
    for caller in pm.get_hookcallers(plugin) or []:
        if not caller.has_spec():
            return f"implements '{caller.name}', which is not a lorag hook (a typo?)"
        if caller.name in hookspecs.REQUEST_HOOKS:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.hookwrapper or impl.wrapper):
                    return f"'{caller.name}' cannot be a wrapper: lorag calls request hooks one by one"
    return None


def impls_of(pm: pluggy.PluginManager, hook: str, plugin_name: str) -> list[Any]:
    """The implementations of `hook` by one plugin (pluggy HookImpl objects)."""
    caller = getattr(pm.hook, hook)
    return [impl for impl in caller.get_hookimpls() if impl.plugin_name == plugin_name]


def call_registration(loaded: LoadedPlugins, plugin: str, hook: str, argument: Any) -> None:
    """One plugin's implementations of a registration hook (tools, readers, commands), called
    with the hook's one argument; the caller decides what a failure means."""
    for impl in impls_of(loaded.pm, hook, plugin):
        impl.function(argument)


def _collect_registrations(loaded: LoadedPlugins, only: str | None = None) -> None:
    """Run register_tools and register_knowledge_readers per plugin, so a crash names it."""
    for name in [n for n, r in loaded.records.items() if r.ok and only in (None, n)]:
        try:
            call_registration(loaded, name, "register_tools", _tool_registrar(loaded, name))
            call_registration(loaded, name, "register_knowledge_readers", _reader_registrar(loaded, name))
        except Exception as err:
            loaded.mark_broken(name, f"register hook failed: {describe(err)}")


def _tool_registrar(loaded: LoadedPlugins, plugin: str) -> Callable[..., None]:
    def register(function: Callable[..., Any], name: str | None = None,
                 description: str | None = None) -> None:
        tool = tool_from_function(function, plugin=plugin, name=name, description=description)
        if tool.name in loaded.tools:
            raise ValueError(f"tool '{tool.name}' is already registered by '{loaded.tools[tool.name].plugin}'")
        loaded.tools[tool.name] = tool

    return register


def _reader_registrar(loaded: LoadedPlugins, plugin: str) -> Callable[[str, Any], None]:
    def register(extension: str, reader: Any) -> None:
        ext = extension.lower() if extension.startswith(".") else f".{extension.lower()}"
        owner = loaded.knowledge_readers.get(ext, (None, None))[0]
        if owner is not None and loaded.records[owner].source != "builtin":
            raise ValueError(f"a reader for '{ext}' is already registered by '{owner}'")
        if owner is not None:
            log.info("knowledge_reader_replaced", extension=ext, builtin=owner, plugin=plugin)
        loaded.knowledge_readers[ext] = (plugin, reader)

    return register


_process_plugins: LoadedPlugins | None = None
_process_env: str | None = None  # $LORAG_LOAD_PLUGINS when the set was loaded
_process_guard = threading.Lock()


def process_plugins(modules: dict[str, str] | None = None) -> LoadedPlugins:
    """The process's one plugin set: built-ins, entry points and `[plugins] modules`.

    Loaded on first use; a later call that names modules not loaded yet adds them. The
    server's PluginHost, ingestion's readers, the tools and the CLI's plugin commands are
    all views over this set, so a plugin is the same object (and sees the same state) everywhere.
    A call the set cannot serve (another $LORAG_LOAD_PLUGINS, a module name bound to another
    path) loads a new set, which becomes the process's.
    """
    global _process_plugins, _process_env
    env = os.environ.get(LOAD_ENV)
    with _process_guard:
        current = _process_plugins
        if current is None or env != _process_env or any(
            name in current.records and current.records[name].target != path for name, path in (modules or {}).items()
        ):
            _process_plugins, _process_env = load_plugins(modules), env
            return _process_plugins
        for name, module_path in (modules or {}).items():
            if name not in current.records:
                _register(current, PluginRecord(name, "module", module_path), partial(import_module, name, module_path))
                _collect_registrations(current, only=name)
        return current


def forget_process_plugins() -> None:
    """Drop the process's plugin set, so the next use loads again (tests that install plugins)."""
    global _process_plugins
    with _process_guard:
        _process_plugins = None


def knowledge_readers() -> dict[str, Any]:
    """Extension -> reader from the process's plugins, for the knowledge part's ingestion."""
    return {ext: reader for ext, (_, reader) in process_plugins().knowledge_readers.items()}
