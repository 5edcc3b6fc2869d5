"""`lorag plugins ...`, and plugin-provided commands on the root group.

`lorag plugins list` loads plugins exactly as the server would (built-ins, entry
points filtered by $LORAG_LOAD_PLUGINS, [plugins] modules) and, with a config,
validates every domain's plugin settings, so a bad lorag.toml fails here first.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from typing import Any

import click

from lorag.cli_options import cli_settings, config_options
from lorag.config import Settings
from lorag.logging import get_logger
from lorag.plugins import hookspecs
from lorag.plugins.manager import (
    LoadedPlugins,
    call_registration,
    describe,
    process_plugins,
)

log = get_logger("lorag.plugins")


@click.group("plugins")
@config_options
def plugins_group() -> None:
    """Inspect installed plugins: versions, hooks, tools and the domains that use them."""


def _host() -> Any:
    from lorag.plugins.host import PluginHost

    settings: Settings = cli_settings()
    return PluginHost.from_settings(settings)


@plugins_group.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_plugins(as_json: bool) -> None:
    """Every plugin: version, source, status, hooks, and the domains that enable it ("*": the default)."""
    host = _host()
    rows = []
    for name, record in sorted(host.records.items()):
        rows.append({
            "name": record.name,
            "version": record.version,
            "source": record.distribution if record.source == "entry point" else record.source,
            "status": record.status,
            "error": record.error,
            "hooks": record.hooks,
            "domains": host.domains_using(name),
            "tools": sorted(t.name for t in host.tools.values() if t.plugin == record.name),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    widths = {key: max(len(key), *(len(str(r[key] or "")) for r in rows)) for key in
              ("name", "version", "source", "status")}
    header = "  ".join(key.upper().ljust(widths[key]) for key in widths) + "  DOMAINS"
    click.echo(header)
    for row in rows:
        cells = "  ".join(str(row[key] or "").ljust(widths[key]) for key in widths)
        click.echo(f"{cells}  {', '.join(row['domains']) or '-'}")
        if row["hooks"]:
            click.echo(f"    hooks: {', '.join(row['hooks'])}")
        if row["tools"]:
            click.echo(f"    tools: {', '.join(row['tools'])}")
        if row["error"]:
            click.echo(f"    {row['status']}: {row['error']}")


@plugins_group.command("tools")
@config_options
def list_tools() -> None:
    """Tools plugins offer, as the OpenAI `tools` entries the models would see."""
    host = _host()
    click.echo(json.dumps([tool.openai_schema() | {"plugin": tool.plugin} for tool in host.tools.values()],
                          indent=2))


@plugins_group.command("hooks")
@click.argument("name", required=False)
def show_hooks(name: str | None) -> None:
    """The hooks a plugin can implement, with their contract (the docstrings in lorag.plugins.hookspecs)."""
    specs = hook_specs()
    if name is not None and name not in specs:
        raise click.UsageError(f"no hook named '{name}' (hooks: {', '.join(specs)})")
    for hook, (signature, doc) in specs.items():
        if name in (None, hook):
            click.echo(f"{signature}\n\n{textwrap.indent(doc, '    ')}\n")


def hook_specs() -> dict[str, tuple[str, str]]:
    """Hook name -> (signature with argument names, docstring), in the order hookspecs declares them."""
    found = {}
    for hook, function in vars(hookspecs).items():
        if callable(function) and hasattr(function, f"{hookspecs.PROJECT}_spec"):
            found[hook] = (f"{hook}({', '.join(inspect.signature(function).parameters)})",
                           inspect.getdoc(function) or "")
    return found


def add_plugin_commands(group: click.Group, loaded: LoadedPlugins | None = None) -> None:
    """Run register_commands for each loaded plugin; a crash there is one line on stderr."""
    loaded = loaded or process_plugins()
    for name in [n for n, r in loaded.records.items() if r.ok]:
        try:
            call_registration(loaded, name, "register_commands", group)
        except Exception as err:  # the rest of the CLI keeps working
            click.echo(f"warning: plugin '{name}' could not add its commands: {describe(err)}", err=True)
