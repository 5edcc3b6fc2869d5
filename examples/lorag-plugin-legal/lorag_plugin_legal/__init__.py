"""lorag plugin for a legal-information domain: a validator, a formatter, a tool, a CLI command
and a knowledge reader for `.statute` files.

Every function below is a lorag hook (see docs/plugins.md); each takes only the
arguments it needs.
"""

from __future__ import annotations

import re
from typing import Any

import click
from pydantic import BaseModel, ConfigDict, Field

from lorag.plugins import PluginContext, Verdict, hookimpl
from lorag_plugin_legal.periods import PERIODS, limitation_period

__version__ = "0.1.0"


class LegalSettings(BaseModel):
    """[plugins.settings.legal] or [plugins.domains.<domain>.settings.legal] in lorag.toml."""

    model_config = ConfigDict(extra="forbid")

    jurisdiction: str = "US-CA"
    disclaimer: str = "This is general legal information, not legal advice."
    forbidden_promises: list[str] = Field(
        default_factory=lambda: ["you will win", "guaranteed to win", "guaranteed outcome", "100% certain"]
    )


@hookimpl
def settings_model() -> type[BaseModel]:
    return LegalSettings


@hookimpl
def request_received(ctx: PluginContext) -> None:
    # The validator may ask for a retry: keep the answer until it has been checked.
    ctx.hold_output()


@hookimpl
def output_complete(text: str, ctx: PluginContext) -> Verdict | None:
    """Never promise an outcome: ask the model again, naming the phrase it used."""
    settings: LegalSettings = ctx.settings
    for phrase in settings.forbidden_promises:
        if re.search(rf"\b{re.escape(phrase)}\b", text, re.IGNORECASE):
            return Verdict.retry(
                f"Do not promise outcomes (you wrote {phrase!r}). Explain the risks and the options instead."
            )
    return None


@hookimpl
def format_output(text: str, response: dict[str, Any], ctx: PluginContext) -> tuple[str, dict[str, Any]]:
    settings: LegalSettings = ctx.settings
    response.setdefault("lorag", {})["legal"] = {"jurisdiction": settings.jurisdiction, "disclaimer": True}
    return f"{text}\n\n---\n_{settings.disclaimer} ({settings.jurisdiction})_", response


@hookimpl
def register_tools(register: Any) -> None:
    register(limitation_period)


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.group()
    def legal() -> None:
        """Legal-domain helpers (from lorag-plugin-legal)."""

    @legal.command()
    @click.argument("claim", type=click.Choice(sorted(next(iter(PERIODS.values())))))
    @click.option("--jurisdiction", "-j", default="US-CA", type=click.Choice(sorted(PERIODS)), show_default=True)
    def limitation(claim: str, jurisdiction: str) -> None:
        """Print the limitation period for CLAIM."""
        found = limitation_period(claim, jurisdiction)  # type: ignore[arg-type]
        click.echo(f"{found['claim']} in {found['jurisdiction']}: {found['years']} years ({found['source']})")


class StatuteReader:
    """Reads `.statute` files: one section per `§` heading, so citations point at the section."""

    def load_data(self, file: Any, extra_info: dict[str, Any] | None = None) -> list[Any]:
        from pathlib import Path

        from llama_index.core import Document

        text = Path(file).read_text(encoding="utf-8")
        title, _, body = text.partition("\n")
        documents = []
        for part in re.split(r"(?m)^(?=§)", body):
            if part.strip():
                heading = part.strip().splitlines()[0]
                documents.append(Document(text=part.strip(), metadata={"section": heading, "title": title.strip()}))
        return documents


@hookimpl
def register_knowledge_readers(register: Any) -> None:
    register(".statute", StatuteReader)
