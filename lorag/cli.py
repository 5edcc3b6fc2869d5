"""The `lorag` command: a click root group; each part adds its own commands.

Subcommands are imported only when used, so `lorag --help` and quick commands do
not pay for importing vLLM or torch. Errors a person can act on (ConfigError,
UsageError, ...) print one readable line and exit non-zero.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from lorag import __version__

# command name -> "module:attribute" of a click command or group.
SUBCOMMANDS: dict[str, str] = {
    "serve": "lorag.server.cli:serve",
    "chat": "lorag.chat:chat",
    "demo": "lorag.demo.command:demo",
    "adapters": "lorag.adapters.cli:adapters_group",
    "models": "lorag.models.cli:models_group",
    "kb": "lorag.knowledge.cli:kb_group",
    "plugins": "lorag.plugins.cli:plugins_group",
    "eval": "lorag.evaluation.cli:eval_command",
    "domains": "lorag.serving.domains_cli:domains_group",
    "route": "lorag.serving.domains_cli:route",
    "keys": "lorag.server.keys_cli:keys_group",
    "state": "lorag.server.state_cli:state_group",
    "fleet": "lorag.fleet.cli:fleet_group",
    "ft": "lorag.finetune.cli:ft_group",
    "completions": "lorag.finetune.completions_cli:completions_group",
    "data": "lorag.finetune.data_cli:data_group",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy
        self._plugin_commands_added = False

    def add_plugin_commands(self) -> None:
        """Commands from plugins' register_commands hook, added on first need."""
        if not self._plugin_commands_added:
            self._plugin_commands_added = True
            from lorag.plugins.cli import add_plugin_commands

            add_plugin_commands(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.add_plugin_commands()
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module_name, attr = self.lazy[cmd_name].split(":")
            command: click.Command = getattr(importlib.import_module(module_name), attr)
            return command
        found = super().get_command(ctx, cmd_name)
        if found is None and not self._plugin_commands_added:
            self.add_plugin_commands()
            found = super().get_command(ctx, cmd_name)
        return found


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorag")
def cli() -> None:
    """lorag: serve domain experts (LoRA adapters + knowledge bases + guards) on one base model."""


def main() -> None:
    """Console entry point: readable one-line errors, non-zero exit codes."""
    from lorag.config import ConfigError
    from lorag.errors import LoragError
    from lorag.logging import configure_logging

    configure_logging()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.UsageError as err:  # a bad flag, argument or value: one line naming it, exit 2
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except ConfigError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except LoragError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
