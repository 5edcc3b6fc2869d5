"""Token ids and logprobs travel with the text they belong to.

The contract (docs/plugins.md, "Usage and logprobs"): a choice's logprobs are those of the
text the client is sent, in order. So:
- the tokens of an attempt a validator rejected, and of tool-call steps, are never sent
  (`usage` still counts them: every generation is paid for, as OpenAI bills every attempt);
- a token goes out no earlier than its text: while a hold-back filter or a held answer keeps
  text back, its tokens wait too (their `token` strings would otherwise show the held text);
- a token whose text an output hook replaced (a redaction, a validator's fix, a formatter's
  rewrite) is left out: its text was never sent, and its logprob must not reveal it.

A token's place in the raw text is measured with the same per-token strings the client sees
(`token_text`). Where those do not add up to the engine's text for a delta (a character split
across tokens), the delta's tokens count as one piece: all sent or all left out together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorag.plugins.stream import OutputStream


def token_text(tokenizer: Any, token_id: int, logprob: Any) -> str:
    """The text of one generated token, as the engine decoded it for its logprobs."""
    decoded = getattr(logprob, "decoded_token", None)
    return decoded if decoded is not None else tokenizer.decode([token_id])


@dataclass
class _Token:
    start: int  # raw text positions of the piece this token belongs to
    end: int
    token_id: int
    logprob: Any


class TokenRelease:
    """One choice's generated tokens of the current attempt, released as its text is."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pending: list[_Token] = []
        self._fed = 0  # raw characters seen

    def add(self, text: str, token_ids: list[int], logprobs: list[Any] | None) -> None:
        """A raw delta's tokens, placed at the delta's raw text."""
        start, self._fed = self._fed, self._fed + len(text)
        entries = logprobs or [None] * len(token_ids)
        pieces = [token_text(self.tokenizer, tid, (lp or {}).get(tid)) for tid, lp in zip(token_ids, entries, strict=False)]
        if "".join(pieces) != text:  # the strings do not line up with the text: one piece
            self._pending += [_Token(start, self._fed, tid, lp) for tid, lp in zip(token_ids, entries, strict=False)]
            return
        position = start
        for tid, lp, piece in zip(token_ids, entries, pieces, strict=False):
            self._pending.append(_Token(position, position + len(piece), tid, lp))
            position += len(piece)

    def release(self, stream: OutputStream, final_text: str | None = None) -> tuple[list[int], list[Any] | None]:
        """The tokens whose text `stream` has handed out, minus those whose text was replaced.

        `final_text`: at the end of a choice, what is really sent in place of the stream's text
        (after validators and formatters): tokens past the point where the two part are left out.
        """
        upto = stream.released_raw
        ready = [t for t in self._pending if t.end <= upto]
        self._pending = [t for t in self._pending if t.end > upto]
        kept = [t for t in ready if not _touched(t, stream.replaced)]
        if final_text is not None:
            same = _common_prefix(stream.text, final_text)
            kept = [t for t in kept if _output_position(t.end, stream.replaced) <= same]
        ids = [t.token_id for t in kept]
        logprobs = [t.logprob for t in kept] if any(t.logprob is not None for t in kept) else None
        return ids, logprobs


def _touched(token: _Token, replaced: list[tuple[int, int, int]]) -> bool:
    for start, end, _ in replaced:
        if start == end:  # an insertion: it splits a token it falls inside
            if token.start < start < token.end:
                return True
        elif token.start < end and start < token.end:
            return True
    return False


def _output_position(raw: int, replaced: list[tuple[int, int, int]]) -> int:
    """Where raw position `raw` (outside every replacement) lands in the stream's output."""
    return raw + sum(length - (end - start) for start, end, length in replaced
                     if end < raw or (end == raw and start != end))  # an insertion at `raw` comes after


def _common_prefix(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    for i in range(limit):
        if a[i] != b[i]:
            return i
    return limit
