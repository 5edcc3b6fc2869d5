"""`lorag models import|list|show|remove`: base models kept under the state directory.

An imported model is served by name: `lorag serve --model NAME` or
`model.path = "NAME"` in lorag.toml.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from lorag.cli_options import cli_settings, config_options
from lorag.models.catalog import get_model, list_models, remove_model, state_models_dir
from lorag.models.convert import DTYPES
from lorag.models.record import ModelRecord


def pass_models_dir(func: Callable[..., Any]) -> Callable[..., Any]:
    """The command gets `<state_dir>/models` of the chosen config first (-c/--state-dir here or on the group)."""
    @functools.wraps(func)
    def with_models_dir(*args: Any, **kwargs: Any) -> Any:
        return func(state_models_dir(cli_settings().state_path), *args, **kwargs)

    return config_options(with_models_dir)


@click.group("models")
@config_options
def models_group() -> None:
    """Import base models (a GGUF file or a Hugging Face folder) and serve them by name."""


@models_group.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--name", help="Name to serve it by (default: from the file or folder name).")
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True,
              help="Weight type to store.")
@click.option("--force", is_flag=True, help="Replace an imported model of the same name.")
@pass_models_dir
def import_cmd(models_dir: Path, source: Path, name: str | None, dtype: str, force: bool) -> None:
    """Turn SOURCE (a .gguf file or an HF model folder) into a servable checkpoint."""
    from lorag.models.importer import import_model

    record = import_model(source, models_dir, name=name, dtype=dtype, force=force)
    click.echo(f"imported {record.name}: {record.architecture}, {_millions(record.parameters)} parameters, "
               f"{record.dtype} -> {record.path}")
    click.echo(f"serve it: lorag serve --model {record.name}  (or model.path = \"{record.name}\" in lorag.toml)")


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_models_dir
def list_cmd(models_dir: Path, as_json: bool) -> None:
    """List imported models."""
    records = list_models(models_dir)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in records], indent=2))
        return
    if not records:
        click.echo(f"no imported models in {models_dir} (add one: lorag models import FILE_OR_FOLDER)")
        return
    rows = [("NAME", "ARCHITECTURE", "PARAMS", "DTYPE", "LICENSE", "SOURCE")]
    rows += [(r.name, r.architecture, _millions(r.parameters), r.dtype, r.license or "-", r.source) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


@models_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_models_dir
def show_cmd(models_dir: Path, name: str, as_json: bool) -> None:
    """Show an imported model's provenance record."""
    record = get_model(models_dir, name)
    if as_json:
        click.echo(json.dumps(record.to_json(), indent=2))
        return
    for key, value in _show_rows(record):
        click.echo(f"{key + ':':<16}{value}")


@models_group.command("remove")
@click.argument("name")
@pass_models_dir
def remove_cmd(models_dir: Path, name: str) -> None:
    """Delete an imported model's folder."""
    record = remove_model(models_dir, name)
    click.echo(f"removed {record.name} ({record.path})")


def _show_rows(record: ModelRecord) -> list[tuple[str, str]]:
    return [
        ("name", record.name),
        ("path", record.path),
        ("architecture", record.architecture),
        ("parameters", f"{record.parameters:,}"),
        ("dtype", record.dtype),
        ("license", record.license or "unknown"),
        ("chat template", "yes" if record.chat_template else "no"),
        ("source", f"{record.source} ({record.source_kind})"),
        ("source sha256", record.source_sha256),
        ("imported at", record.imported_at),
        ("lorag version", record.lorag_version),
    ]


def _millions(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"
