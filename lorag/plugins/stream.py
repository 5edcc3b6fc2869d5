"""Filtering output on its way out, with a hold-back window that makes chunking irrelevant.

The stream keeps the last `hold_back` characters of raw output unsent. Every
`step` characters (at fixed positions of the raw text: step, 2*step, ...) it asks
the scanner about a window of raw text: `context` characters already sent, then
everything unsent up to `checkpoint + hold_back`. The scanner returns edits; the
stream sends the text up to the checkpoint with the edits applied, except that it
stops before an edit that reaches past the checkpoint (the edit is asked for again
next time, with more text, so a secret split across chunks is caught whole).

Because the windows sit at fixed positions of the raw text, the sequence of scans
and their results does not depend on how the text arrived: feeding it in one
piece (a non-streamed response) or token by token gives byte-identical output,
including where a block cuts it off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from lorag.errors import LoragError
from lorag.plugins.errors import ContentBlocked
from lorag.plugins.types import Replace

Scanner = Callable[[str, int, bool], Iterable[Replace]]

DEFAULT_CONTEXT = 16


def merge_edits(edits: Iterable[Replace]) -> list[Replace]:
    """Sort and merge overlapping edits (their replacements are joined: nothing leaks between)."""
    merged: list[Replace] = []
    for edit in sorted(edits, key=lambda e: (e.start, -e.end)):
        if merged and edit.start < merged[-1].end:
            last = merged[-1]
            if edit.end > last.end:
                merged[-1] = Replace(last.start, edit.end, last.text + edit.text)
            continue
        merged.append(edit)
    return merged


class OutputStream:
    """feed(delta) -> text safe to send now; finish() -> the rest; .blocked once a filter refused."""

    def __init__(self, scan: Scanner | None, *, hold_back: int, held: bool = False,
                 step: int | None = None, context: int = DEFAULT_CONTEXT) -> None:
        self._scan = scan
        self._hold = hold_back
        self._step = step or max(16, hold_back // 2)
        self._context = context
        self.held = held
        self.blocked: str | None = None
        self.blocked_by: str | None = None
        self.finished = False
        self._buf = ""  # raw text from absolute position _buf_start on
        self._buf_start = 0
        self._pending: list[str] = []
        self._raw_len = 0
        self._done = 0  # raw text before this position has been turned into output
        self._next = self._step  # the next checkpoint
        self._out: list[str] = []
        self._fed = 0  # raw characters fed so far (scanned or not)
        # Edits applied, in raw positions: (start, end, length of the replacement). Token logprobs
        # follow the text they belong to (lorag.serving.token_release) and skip replaced text.
        self.replaced: list[tuple[int, int, int]] = []

    @property
    def text(self) -> str:
        """All filtered text so far, sent or held."""
        return "".join(self._out)

    @property
    def emitted(self) -> str:
        """What feed() and finish() have returned so far."""
        return self.text if (self.finished or not self.held) else ""

    @property
    def released_raw(self) -> int:
        """Raw characters whose output has been handed out by feed()/finish() (none while held)."""
        if self.held and not self.finished:
            return 0
        return self._fed if self._scan is None else self._done

    def would_scan(self, delta: str) -> bool:
        """Whether feed(delta) calls the scanner (the plugins); otherwise it is an append."""
        return (self._scan is not None and self.blocked is None and not self.finished
                and self._raw_len + len(delta) >= self._next + self._hold)

    def feed(self, delta: str) -> str:
        if self.blocked is not None or self.finished or not delta:
            return ""
        self._fed += len(delta)
        if self._scan is None:
            return self._release(delta)
        self._pending.append(delta)
        self._raw_len += len(delta)
        if self._raw_len < self._next + self._hold:
            return ""
        self._absorb()
        produced = []
        while self.blocked is None and self._raw_len >= self._next + self._hold:
            produced.append(self._advance(self._next, final=False))
            self._next += self._step
        return self._release("".join(produced))

    def finish(self) -> str:
        if self.finished:
            return ""
        if self._scan is not None and self.blocked is None:
            self._absorb()
            self._out.append(self._advance(self._raw_len, final=True))
        self.finished = True
        if self.blocked is not None:
            return ""
        if self.held:
            return self.text
        return self._out[-1] if self._scan is not None else ""

    def _release(self, text: str) -> str:
        self._out.append(text)
        return "" if self.held else text

    def _absorb(self) -> None:
        if self._pending:
            self._buf += "".join(self._pending)
            self._pending.clear()

    def _advance(self, checkpoint: int, *, final: bool) -> str:
        """Turn raw text up to `checkpoint` (less, before an edit that reaches past it) into output."""
        assert self._scan is not None
        window_start = max(self._buf_start, self._done - self._context)
        window_end = self._raw_len if final else checkpoint + self._hold
        window = self._buf[window_start - self._buf_start:window_end - self._buf_start]
        start = self._done - window_start
        try:
            edits = merge_edits(self._scan(window, start, final))
        except ContentBlocked as err:
            self.blocked, self.blocked_by = err.message, err.plugin
            return ""
        except LoragError as err:  # a plugin crashed or timed out: fail closed
            self.blocked, self.blocked_by = err.message, getattr(err, "plugin", None)
            return ""
        cut = len(window) if final else checkpoint - window_start
        for edit in edits:
            if edit.start < cut < edit.end:
                cut = max(edit.start, start)  # wait for the whole match
                break
        pieces = []
        pos = start
        for edit in edits:
            if edit.end <= start and edit.start < start:
                continue  # about text already sent
            if edit.start == edit.end:
                applies = start <= edit.start < cut or (final and edit.start == cut)
            else:
                applies = edit.end <= cut
            if not applies:
                if edit.start >= cut:
                    break
                continue
            begin = max(edit.start, pos)
            pieces.append(window[pos:begin])
            pieces.append(edit.text)
            self.replaced.append((window_start + begin, window_start + max(pos, edit.end), len(edit.text)))
            pos = max(pos, edit.end)
        pieces.append(window[pos:cut])
        self._done = window_start + cut
        keep_from = max(self._buf_start, self._done - self._context)
        self._buf = self._buf[keep_from - self._buf_start:]
        self._buf_start = keep_from
        return "".join(pieces)
