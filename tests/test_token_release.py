"""Token ids and logprobs travel with the text they belong to (lorag.serving.token_release)."""

from __future__ import annotations

from lorag.plugins.stream import OutputStream
from lorag.plugins.types import Replace
from lorag.serving.token_release import TokenRelease
from tests.echo_engine import CharTokenizer


def redact(word: str, by: str) -> object:
    def scan(window: str, start: int, final: bool) -> list[Replace]:
        at = window.find(word)
        return [Replace(at, at + len(word), by)] if at >= 0 else []

    return scan


def feed(stream: OutputStream, tokens: TokenRelease, pieces: list[str],
         final_text: str | None = None) -> tuple[str, str]:
    """(text sent, text of the tokens sent) for `pieces` fed one delta each."""
    sent, released = "", []
    for piece in pieces:
        tokens.add(piece, [ord(c) for c in piece], None)
        sent += stream.feed(piece)
        released += tokens.release(stream)[0]
    sent += stream.finish()
    released += tokens.release(stream, final_text)[0]
    return sent, "".join(chr(t) for t in released)


def test_tokens_wait_for_held_back_text_and_skip_what_a_filter_replaced() -> None:
    text = "call me at secret-number please, or write"
    for pieces in ([text], [text[i:i + 3] for i in range(0, len(text), 3)]):
        stream = OutputStream(redact("secret-number", "[X]"), hold_back=16)  # type: ignore[arg-type]
        tokens = TokenRelease(CharTokenizer())
        sent, released = feed(stream, tokens, pieces)
        assert sent == "call me at [X] please, or write"
        assert released == "call me at  please, or write"  # streamed or whole: the same tokens


def test_a_held_answer_sends_its_tokens_at_the_end_up_to_where_a_fix_changed_it() -> None:
    stream = OutputStream(None, hold_back=16, held=True)
    tokens = TokenRelease(CharTokenizer())
    tokens.add("abc", [97, 98], None)  # a delta whose token strings do not add up: one piece
    stream.feed("abc")
    assert tokens.release(stream) == ([], None)  # held: nothing yet
    tokens.add("def", [100, 101, 102], None)
    stream.feed("def")
    stream.finish()
    ids, _ = tokens.release(stream, final_text="abcdXX")  # a validator fixed the end
    assert ids == [97, 98, 100]  # "abc" whole and "d"; "e" and "f" were replaced
