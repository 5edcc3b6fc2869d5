"""Build a domain's prompt and fit it to the context window.

    system prompt + numbered context  (one system message)
    few-shot examples                 (user / assistant pairs)
    the conversation                  (as the client sent it, after input hooks)

Retrieval must never cause a context-length error: context chunks are dropped
from the least relevant up (the last one that partly fits is cut), then
examples, until the prompt leaves room for the output. Only a conversation
that is too long on its own is the client's error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorag.knowledge.retrieval import Hit
from lorag.serving.settings import Example

CONTEXT_HEADER = "Context:"
CONTEXT_INSTRUCTION = "Answer from the context above and cite it as [n]."
# Characters of a chunk shown in a citation's snippet.
SNIPPET_CHARS = 240


def context_block(hits: list[Hit]) -> str:
    """Numbered chunks, each with where it comes from: the [n] that answers cite."""
    lines = [CONTEXT_HEADER]
    for number, hit in enumerate(hits, start=1):
        where = hit.source + (f", {hit.location}" if hit.location else "")
        lines.append(f"[{number}] ({where}) {hit.text.strip()}")
    lines.append(CONTEXT_INSTRUCTION)
    return "\n".join(lines)


def build_messages(system_prompt: str, hits: list[Hit], examples: list[Example],
                   conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages the chat template renders; the client's own system text joins the domain's."""
    system_parts = [system_prompt.strip()] if system_prompt.strip() else []
    rest = list(conversation)
    while rest and rest[0]["role"] in ("system", "developer"):
        system_parts.append(str(rest.pop(0)["content"]))
    if hits:
        system_parts.append(context_block(hits))
    messages: list[dict[str, Any]] = []
    if system_parts:
        messages.append({"role": "system", "content": "\n\n".join(system_parts)})
    for example in examples:
        messages.append({"role": "user", "content": example.question})
        messages.append({"role": "assistant", "content": example.answer})
    return messages + rest


def citation(number: int, hit: Hit) -> dict[str, Any]:
    text = " ".join(hit.text.split())
    snippet = text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1].rstrip() + "…"
    return {"index": number, "kb": hit.kb, "source": hit.source, "location": hit.location,
            "snippet": snippet, "score": hit.score}


@dataclass
class FittedPrompt:
    tokens: list[int]
    hits: list[Hit]
    examples: list[Example]
    dropped_hits: int
    dropped_examples: int


def fit_prompt(
    render: Callable[[list[Hit], list[Example]], list[int]],
    count: Callable[[str], int],
    hits: list[Hit],
    examples: list[Example],
    budget: int,
    max_context_tokens: int | None = None,
) -> FittedPrompt | None:
    """The longest prompt within `budget` tokens: best hits first, then examples.

    `render` turns (hits, examples) into prompt tokens; `count` measures a chunk's text.
    None when even the bare conversation is over budget (the caller's error to report).
    """
    kept = _within_cap(hits, count, max_context_tokens)
    tokens = render(kept, examples)
    if len(tokens) <= budget:
        return FittedPrompt(tokens, kept, examples, len(hits) - len(kept), 0)
    bare = render([], [])
    if len(bare) > budget:
        return None
    shown = list(examples)
    # Examples go first only when even one chunk cannot fit next to them.
    while shown and len(render(kept[:1], shown)) > budget:
        shown.pop()
    lo, hi = 0, len(kept)  # the largest number of whole hits that fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(render(kept[:mid], shown)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    chosen = kept[:lo]
    if lo < len(kept):
        partial = _cut_to_fit(render, count, chosen, kept[lo], shown, budget)
        if partial is not None:
            chosen = [*chosen, partial]
    tokens = render(chosen, shown)
    return FittedPrompt(tokens, chosen, shown, len(hits) - len(chosen), len(examples) - len(shown))


def _within_cap(hits: list[Hit], count: Callable[[str], int], cap: int | None) -> list[Hit]:
    if cap is None:
        return list(hits)
    kept, used = [], 0
    for hit in hits:
        used += count(hit.text)
        if used > cap:
            break
        kept.append(hit)
    return kept


def _cut_to_fit(render: Callable[[list[Hit], list[Example]], list[int]], count: Callable[[str], int],
                chosen: list[Hit], hit: Hit, examples: list[Example], budget: int) -> Hit | None:
    """The hit's text cut (at a word boundary) so the prompt just fits; None if no useful part does."""
    spare = budget - len(render([*chosen, _with_text(hit, "")], examples))
    if spare < 16:
        return None
    words = hit.text.split()
    lo, hi = 0, len(words)
    while lo < hi:  # most words whose text fits in `spare` tokens
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid]) + " …") <= spare:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return None
    cut = _with_text(hit, " ".join(words[:lo]) + " …")
    return cut if len(render([*chosen, cut], examples)) <= budget else None


def _with_text(hit: Hit, text: str) -> Hit:
    return Hit(kb=hit.kb, source=hit.source, location=hit.location, text=text, score=hit.score,
               metadata=hit.metadata)
