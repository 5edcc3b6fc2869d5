"""The hold-back stream: chunking never changes what the client gets, and nothing slips out early."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from lorag.plugins.errors import ContentBlocked
from lorag.plugins.stream import OutputStream, merge_edits
from lorag.plugins.types import Replace

TOKEN = re.compile(r"ab+c")
STOP = "zz"


def scanner(window: str, start: int, final: bool) -> list[Replace]:
    """A filter with both kinds of match: bounded ones wait at the edge, 'k+' runs may grow."""
    if STOP in window[max(0, start - 1):]:
        raise ContentBlocked("stopped")
    edits = [Replace(m.start(), m.end(), "<T>") for m in TOKEN.finditer(window)
             if m.end() > start and (final or m.end() < len(window))]
    edits += [Replace(m.start(), m.end(), "<K>") for m in re.finditer(r"k{3,}", window) if m.end() > start]
    return edits


def run(chunks: list[str], hold_back: int = 12, held: bool = False) -> tuple[list[str], str | None]:
    stream = OutputStream(scanner, hold_back=hold_back, held=held)
    sent = [stream.feed(chunk) for chunk in chunks]
    sent.append(stream.finish())
    return sent, stream.blocked


def split(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({c for c in cuts if 0 < c < len(text)})
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


texts = st.text(alphabet="abck z.", min_size=0, max_size=200)


@settings(max_examples=300, deadline=None)
@given(texts, st.lists(st.integers(min_value=1, max_value=199), max_size=40), st.sampled_from([8, 12, 30]))
def test_any_chunking_gives_the_output_of_one_piece(text: str, cuts: list[int], hold_back: int) -> None:
    whole, whole_blocked = run([text], hold_back)
    parts, blocked = run(split(text, cuts), hold_back)
    assert "".join(parts) == "".join(whole) and blocked == whole_blocked


@settings(max_examples=200, deadline=None)
@given(texts, st.lists(st.integers(min_value=1, max_value=199), max_size=40))
def test_what_is_sent_is_filtered(text: str, cuts: list[int]) -> None:
    parts, blocked = run(split(text, cuts))
    sent = "".join(parts)
    assert not TOKEN.search(sent) and "kkk" not in sent
    if blocked:
        assert STOP not in sent
    else:
        assert sent == re.sub(r"k{3,}", "<K>", TOKEN.sub("<T>", text))


def test_nothing_is_sent_before_the_hold_back_fills() -> None:
    stream = OutputStream(scanner, hold_back=12)
    assert [stream.feed(c) for c in "hello world"] == [""] * 11
    assert stream.feed(" and then some more") == "hello world and "  # up to the first checkpoint (16)
    assert stream.finish() != ""


def test_a_growing_match_is_held_until_it_ends() -> None:
    stream = OutputStream(scanner, hold_back=8)
    sent = stream.feed("start " + "k" * 100)
    assert sent == "start "
    sent += stream.feed(" end of it")
    sent += stream.finish()
    assert sent == "start <K> end of it"


def test_held_stream_sends_everything_at_the_end() -> None:
    text = "some abbbc text kkkk and more " * 5
    held, _ = run([text[i:i + 7] for i in range(0, len(text), 7)], held=True)
    assert all(part == "" for part in held[:-1])
    assert held[-1] == "".join(run([text])[0])


def test_block_cuts_both_modes_at_the_same_place() -> None:
    text = "a" * 50 + " zz " + "b" * 20
    whole, blocked = run([text])
    assert blocked == "stopped"
    for size in (1, 3, 17):
        parts, blocked = run([text[i:i + size] for i in range(0, len(text), size)])
        assert ("".join(parts), blocked) == ("".join(whole), "stopped")


def test_without_filters_text_passes_straight_through() -> None:
    stream = OutputStream(None, hold_back=128)
    assert stream.feed("tok") == "tok" and stream.finish() == "" and stream.text == "tok"


def test_merge_edits_never_drops_an_overlap() -> None:
    merged = merge_edits([Replace(5, 9, "[B]"), Replace(0, 6, "[A]"), Replace(12, 12, "+")])
    assert merged == [Replace(0, 9, "[A][B]"), Replace(12, 12, "+")]
