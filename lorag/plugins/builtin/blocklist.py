"""Built-in plugin `blocklist`: sensitive words, phrases and patterns, per domain.

A term in the input refuses the request; a chunk of retrieved context that
contains one is dropped; a term in the output stops the answer, which ends with
finish_reason "content_filter" and `message`, streamed or not. Terms match whole
words, case-insensitively, with any run of whitespace between a phrase's words;
`patterns` are regular expressions used as they are.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from lorag.plugins.errors import ContentBlocked
from lorag.plugins.hookspecs import hookimpl
from lorag.plugins.types import PluginContext

MAX_TERM_CHARS = 256


class BlocklistSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    terms: list[str] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list, description="Regular expressions (Python syntax).")
    case_sensitive: bool = False
    whole_words: bool = True
    input: bool = True
    context: bool = True
    output: bool = True
    message: str = "The answer was stopped by the content filter."
    input_message: str = "The request was refused by the content filter."
    _terms_re: re.Pattern[str] | None = PrivateAttr(default=None)
    _patterns_re: re.Pattern[str] | None = PrivateAttr(default=None)

    @field_validator("terms")
    @classmethod
    def _terms(cls, value: list[str]) -> list[str]:
        for term in value:
            if not term.strip():
                raise ValueError("terms must not be blank")
            if len(term) > MAX_TERM_CHARS:
                raise ValueError(f"a term is longer than {MAX_TERM_CHARS} characters: {term[:40]!r}...")
        return value

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {err}") from None
        return value

    def model_post_init(self, __context: Any) -> None:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        if self.terms:
            words = [r"\s+".join(map(re.escape, term.split())) for term in self.terms]
            body = "|".join(sorted(words, key=len, reverse=True))
            self._terms_re = re.compile(rf"(?<!\w)(?:{body})(?!\w)" if self.whole_words else body, flags)
        if self.patterns:
            self._patterns_re = re.compile("|".join(f"(?:{p})" for p in self.patterns), flags)

    @property
    def min_hold_back_chars(self) -> int:
        """The output window must hold the longest term whole (plus room for its word boundary)."""
        return max((len(term) + 2 for term in self.terms), default=0)

    def first_match(self, text: str, *, start: int = 0, final: bool = True) -> re.Match[str] | None:
        """A match reaching past `start`; while not final, a term touching the end waits for more text."""
        if self._terms_re is not None:
            for m in self._terms_re.finditer(text):
                if m.end() > start and (final or m.end() < len(text)):
                    return m
        if self._patterns_re is not None:
            for m in self._patterns_re.finditer(text):
                if m.end() > start:
                    return m
        return None


@hookimpl
def settings_model() -> type[BaseModel]:
    return BlocklistSettings


@hookimpl
def request_received(messages: list[dict[str, Any]], ctx: PluginContext) -> None:
    settings: BlocklistSettings = ctx.settings
    if not settings.input:
        return
    for message in messages:
        content = message.get("content")
        text = content if isinstance(content, str) else " ".join(
            part.get("text", "") for part in content or [] if isinstance(part, dict))
        if settings.first_match(text):
            raise ContentBlocked(settings.input_message)


@hookimpl
def context_retrieved(chunks: list[Any], ctx: PluginContext) -> list[Any] | None:
    settings: BlocklistSettings = ctx.settings
    if not settings.context:
        return None
    return [chunk for chunk in chunks if not settings.first_match(_text_of(chunk))]


@hookimpl
def output_chunk(window: str, start: int, final: bool, ctx: PluginContext) -> None:
    settings: BlocklistSettings = ctx.settings
    if settings.output and settings.first_match(window, start=start, final=final):
        raise ContentBlocked(settings.message)


def _text_of(chunk: Any) -> str:
    return str(chunk.get("text", "") if isinstance(chunk, dict) else getattr(chunk, "text", ""))
