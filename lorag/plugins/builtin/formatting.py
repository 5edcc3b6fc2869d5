"""Built-in plugin `formatting`: the answer as markdown, plain text, JSON or YAML, with sources.

Citations are the retrieved sources, numbered [1], [2], ... in the prompt; the
model cites them with those markers and this plugin adds the list of sources
(all of them, or only the cited ones). Markdown only appends, so it streams as
is; the other styles rewrite the whole text and hold the output until the end.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from lorag.plugins.hookspecs import hookimpl
from lorag.plugins.types import PluginContext

MARKER_RE = re.compile(r"\[(\d{1,3})\]")


class FormattingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    style: Literal["markdown", "plain", "json", "yaml"] = "markdown"
    sources: Literal["all", "cited", "none"] = "all"
    sources_title: str = "Sources"


def source_label(citation: Any) -> str:
    """'source, location' from a knowledge hit or a dict (source/title/url and location)."""
    def get(key: str) -> Any:
        return citation.get(key) if isinstance(citation, dict) else getattr(citation, key, None)

    name = get("title") or get("source") or get("url") or str(citation)
    location = get("location")
    return f"{name}, {location}" if location else str(name)


def cited_numbers(text: str, count: int) -> list[int]:
    """Valid [n] markers in order of first use."""
    seen: list[int] = []
    for m in MARKER_RE.finditer(text):
        n = int(m.group(1))
        if 1 <= n <= count and n not in seen:
            seen.append(n)
    return seen


def listed_sources(text: str, citations: list[Any], which: str) -> list[tuple[int, str]]:
    if which == "none" or not citations:
        return []
    numbers = range(1, len(citations) + 1) if which == "all" else sorted(cited_numbers(text, len(citations)))
    return [(n, source_label(citations[n - 1])) for n in numbers]


_MD_RULES = [
    (re.compile(r"^```[^\n]*\n?", re.M), ""),  # code fences
    (re.compile(r"^\s{0,3}#{1,6}\s+", re.M), ""),  # headings
    (re.compile(r"^\s{0,3}>\s?", re.M), ""),  # block quotes
    (re.compile(r"!\[([^\]]*)\]\(([^)]+)\)"), r"\1 (\2)"),  # images
    (re.compile(r"\[([^\]]+)\]\(([^)]+)\)"), r"\1 (\2)"),  # links
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),  # bold
    (re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])"), r"\1"),  # italics
    (re.compile(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)"), r"\1"),
    (re.compile(r"`([^`\n]+)`"), r"\1"),  # inline code
    (re.compile(r"^\s{0,3}[*+]\s+", re.M), "- "),  # bullets
]


def plain(text: str) -> str:
    for pattern, replacement in _MD_RULES:
        text = pattern.sub(replacement, text)
    return text


def structured(text: str, sources: list[tuple[int, str]]) -> Any:
    """The answer as data: parsed JSON when it is JSON, else {"answer": text}; sources added."""
    try:
        value: Any = json.loads(text)
    except ValueError:
        value = {"answer": text}
    if sources:
        listed = [{"n": n, "source": label} for n, label in sources]
        value = {**value, "sources": listed} if isinstance(value, dict) and "sources" not in value \
            else {"answer": value, "sources": listed}
    return value


def render(text: str, citations: list[Any], settings: FormattingSettings) -> str:
    sources = listed_sources(text, citations, settings.sources)
    if settings.style == "json":
        return json.dumps(structured(text, sources), ensure_ascii=False, indent=2)
    if settings.style == "yaml":
        return yaml.safe_dump(structured(text, sources), allow_unicode=True, sort_keys=False)
    if settings.style == "plain":
        lines = [f"[{n}] {label}" for n, label in sources]
        tail = f"\n\n{settings.sources_title}:\n" + "\n".join(lines) if lines else ""
        return plain(text) + tail
    lines = [f"[{n}] {label}" for n, label in sources]
    return text + (f"\n\n**{settings.sources_title}**\n\n" + "  \n".join(lines) if lines else "")


@hookimpl
def settings_model() -> type[BaseModel]:
    return FormattingSettings


@hookimpl
def request_received(ctx: PluginContext) -> None:
    if ctx.settings.style != "markdown":
        ctx.hold_output()  # rewrites the whole text: nothing can be sent before it is complete


@hookimpl
def format_output(text: str, response: dict[str, Any], citations: list[Any],
                  ctx: PluginContext) -> tuple[str, dict[str, Any]]:
    settings: FormattingSettings = ctx.settings
    response.setdefault("lorag", {})["format"] = settings.style
    return render(text, citations, settings), response
