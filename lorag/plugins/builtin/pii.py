"""Built-in plugin `pii`: typed placeholders for personal data and secrets.

The input (chosen roles), the retrieved context and the output are scanned for
e-mail addresses, phone numbers, payment cards, IBANs, Chinese resident IDs, IP
addresses and API keys (lorag.plugins.builtin.pii_entities). Each value becomes
a placeholder such as [EMAIL_1]; the same value gets the same placeholder within
a request, so the model can still refer to it. With `restore = true` the
placeholders the model repeats are put back in its answer, from a vault that
lives in this request's plugin state only: values from the user's own input are
restored, never values from the knowledge base or ones the model made up.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lorag.plugins.builtin.pii_entities import KINDS, find_entities
from lorag.plugins.hookspecs import hookimpl
from lorag.plugins.types import PluginContext, Replace

Kind = Literal["SECRET", "EMAIL", "IBAN", "CN_ID", "CARD", "PHONE", "IP"]
Role = Literal["system", "developer", "user", "assistant", "tool"]
ALL_KINDS: list[Kind] = ["SECRET", "EMAIL", "IBAN", "CN_ID", "CARD", "PHONE", "IP"]
DEFAULT_ROLES: list[Role] = ["user", "assistant", "tool"]
PLACEHOLDER_RE = re.compile(r"\[(?:" + "|".join(KINDS) + r")_\d{1,6}\]")


class PiiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    entities: list[Kind] = Field(default_factory=lambda: list(ALL_KINDS))
    input: bool = True
    context: bool = True
    output: bool = True
    restore: bool = False
    roles: list[Role] = Field(default_factory=lambda: list(DEFAULT_ROLES))

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self.entities)


class Vault:
    """Placeholders of one request: value <-> [KIND_n], and where each value came from."""

    def __init__(self) -> None:
        self._by_value: dict[tuple[str, str], str] = {}
        self._values: dict[str, tuple[str, str]] = {}
        self._counts: dict[str, int] = {}

    def placeholder(self, kind: str, value: str, origin: str) -> str:
        key = (kind, value)
        found = self._by_value.get(key)
        if found is None:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            found = f"[{kind}_{self._counts[kind]}]"
            self._by_value[key] = found
            self._values[found] = (value, origin)
        return found

    def restorable(self, placeholder: str) -> str | None:
        value, origin = self._values.get(placeholder, ("", ""))
        return value if origin == "input" else None


def vault(ctx: PluginContext) -> Vault:
    found = ctx.state.get("vault")
    if found is None:
        found = ctx.state["vault"] = Vault()
    return found


def redact(text: str, kinds: frozenset[str], store: Vault, origin: str) -> str:
    entities = find_entities(text, kinds)
    if not entities:
        return text
    pieces, pos = [], 0
    for ent in entities:
        pieces += [text[pos:ent.start], store.placeholder(ent.kind, ent.value(text), origin)]
        pos = ent.end
    pieces.append(text[pos:])
    return "".join(pieces)


@hookimpl
def settings_model() -> type[BaseModel]:
    return PiiSettings


@hookimpl
def request_received(messages: list[dict[str, Any]], ctx: PluginContext) -> list[dict[str, Any]] | None:
    settings: PiiSettings = ctx.settings
    if not settings.input:
        return None
    store, changed, result = vault(ctx), False, []
    for message in messages:
        content = message.get("content")
        if message.get("role") in settings.roles and content:
            new = dict(message)
            if isinstance(content, str):
                new["content"] = redact(content, settings.kinds, store, "input")
            elif isinstance(content, list):
                new["content"] = [
                    {**part, "text": redact(part["text"], settings.kinds, store, "input")}
                    if isinstance(part, dict) and isinstance(part.get("text"), str) else part
                    for part in content
                ]
            changed = changed or new != message
            message = new
        result.append(message)
    return result if changed else None


@hookimpl
def context_retrieved(chunks: list[Any], ctx: PluginContext) -> list[Any] | None:
    settings: PiiSettings = ctx.settings
    if not settings.context:
        return None
    store = vault(ctx)
    return [_with_text(chunk, redact(_text_of(chunk), settings.kinds, store, "context")) for chunk in chunks]


@hookimpl
def output_chunk(window: str, start: int, final: bool, ctx: PluginContext) -> list[Replace] | None:
    settings: PiiSettings = ctx.settings
    store = vault(ctx)
    edits: list[Replace] = []
    if settings.output:
        for ent in find_entities(window, settings.kinds, start=start, final=final):
            if not final and ent.end == len(window):
                # seen in part: lorag holds it back and never applies this edit, so no number yet
                edits.append(Replace(ent.start, ent.end, ""))
            else:
                edits.append(Replace(ent.start, ent.end, store.placeholder(ent.kind, ent.value(window), "output")))
    if settings.restore and "[" in window:
        for m in PLACEHOLDER_RE.finditer(window):
            value = store.restorable(m.group())
            if value is not None and m.end() > start:
                edits.append(Replace(m.start(), m.end(), value))
    return edits


def _text_of(chunk: Any) -> str:
    return str(chunk.get("text", "") if isinstance(chunk, dict) else getattr(chunk, "text", ""))


def _with_text(chunk: Any, text: str) -> Any:
    """A copy of the chunk with new text (chunks are shared with the retriever: never mutate)."""
    if text == _text_of(chunk):
        return chunk
    if isinstance(chunk, dict):
        return {**chunk, "text": text}
    if dataclasses.is_dataclass(chunk) and not isinstance(chunk, type):
        return dataclasses.replace(chunk, text=text)
    clone = copy.copy(chunk)
    clone.text = text
    return clone
