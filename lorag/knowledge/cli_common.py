"""What the `lorag kb` commands share: the service of the chosen config, JSON output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from lorag.cli_options import cli_settings


@contextmanager
def knowledge_service() -> Iterator[Any]:
    """The knowledge service of the chosen config and state dir, closed (store unlocked) after."""
    from lorag.knowledge.service import KnowledgeService

    service = KnowledgeService.from_settings(cli_settings())
    try:
        yield service
    finally:
        service.close()


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def fusion_text(settings: dict[str, Any]) -> str:
    from lorag.knowledge.fusion import Fusion

    return Fusion.from_settings_dict(settings).describe()
