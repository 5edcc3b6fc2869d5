"""The small values plugins receive and return: context, replacements, verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Action = Literal["pass", "fix", "retry", "refuse"]


@dataclass
class RequestState:
    """What every plugin of one request shares with lorag (not with each other's state)."""

    hold_output: bool = False
    attempt: int = 0


class KnowledgeSearch(Protocol):
    def __call__(self, query: str, top_k: int | None = None) -> list[dict[str, Any]]:
        """The best passages of the domain's knowledge bases: source, location, text, score, kb."""
        ...


@dataclass
class PluginContext:
    """One plugin's view of one request.

    `settings` is the plugin's validated settings for this domain (its
    `settings_model`, or a plain dict when it declares none). `state` is a dict
    private to this plugin and this request, dropped when the request ends: keep
    per-request data there (the PII vault lives there), never in module globals.
    `search_knowledge` searches the domain's knowledge bases with the domain's retrieval
    settings and the caller's access (None for a request without a domain); the built-in
    `search_knowledge` tool is one user of it.
    """

    request_id: str
    domain: str
    plugin: str
    settings: Any
    state: dict[str, Any] = field(default_factory=dict)
    search_knowledge: KnowledgeSearch | None = None
    _request: RequestState = field(default_factory=RequestState, repr=False)

    @property
    def attempt(self) -> int:
        """0 for the first generation, 1, 2, ... for retries asked by a validator."""
        return self._request.attempt

    def hold_output(self) -> None:
        """Withhold the whole answer until `output_complete` and `format_output` have run.

        Call it (from any hook before generation) when your plugin may rewrite the
        text as a whole: a fix, a retry or a reformat cannot unsend streamed text.
        """
        self._request.hold_output = True


@dataclass(frozen=True, slots=True)
class Replace:
    """Replace `window[start:end]` with `text` (an `output_chunk` result)."""

    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Verdict:
    """What the validators decided about a complete output.

    pass: send `text`. fix: send `text` instead (a corrected version). retry: ask
    the model again with `message` appended as a user turn. refuse: send
    `message` instead of the answer and end with finish_reason "content_filter".
    """

    action: Action
    text: str = ""
    message: str | None = None
    plugin: str | None = None

    @classmethod
    def passed(cls, text: str) -> Verdict:
        return cls("pass", text)

    @classmethod
    def fix(cls, text: str, message: str | None = None) -> Verdict:
        return cls("fix", text, message)

    @classmethod
    def retry(cls, message: str) -> Verdict:
        return cls("retry", "", message)

    @classmethod
    def refuse(cls, message: str) -> Verdict:
        return cls("refuse", "", message)
