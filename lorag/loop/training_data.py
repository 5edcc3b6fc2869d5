"""Stored completions and their feedback as fine-tuning lines, each saying where it came from.

Pure: records in, JSONL records out (the formats `lorag adapters train` and OpenAI's fine-tuning
take). What needs the running server (sampling answers, a teacher, graders, the domain's
guards) is lorag.improve's; the selection rules live here so they are tested on their own:

- supervised: a completion whose ratings average at least `min_score` gives its answer; one with a
  corrected answer gives the correction instead (the newest correction wins), however it was scored;
- preference: every pairwise preference; and, per prompt, the best- and the worst-rated answers
  when their scores differ by at least `margin`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lorag.loop.completions import StoredCompletion
from lorag.loop.feedback import Preference, Rating

PromptView = Literal["conversation", "rendered"]
PROVENANCE = "provenance"


@dataclass
class Line:
    """One training line and what it was made from (stored as the line's `provenance`)."""

    record: dict[str, Any]
    kind: str
    completions: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.record, PROVENANCE: {"kind": self.kind, "completions": self.completions, **self.extra}}


def prompt_of(record: StoredCompletion, view: PromptView = "conversation") -> list[dict[str, Any]]:
    """The messages a training line starts with: the guarded conversation, or the full rendered prompt
    (system prompt, retrieved context, examples) the model was actually given."""
    if view == "rendered" and record.context.get("prompt_messages"):
        return [dict(m) for m in record.context["prompt_messages"]]
    return [dict(m) for m in record.messages]


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def supervised_line(prompt: list[dict[str, Any]], answer: str, kind: str, completions: list[str],
                    **extra: Any) -> Line:
    return Line({"messages": [*prompt, assistant(answer)]}, kind, completions, extra)


def preference_line(prompt: list[dict[str, Any]], chosen: str, rejected: str, kind: str, completions: list[str],
                    **extra: Any) -> Line:
    return Line({"input": {"messages": prompt}, "preferred_output": [assistant(chosen)],
                 "non_preferred_output": [assistant(rejected)]}, kind, completions, extra)


def mean_scores(ratings: Iterable[Rating]) -> dict[str, float]:
    """Completion id -> the mean of its ratings' scores (ratings without a score are left out)."""
    scores: dict[str, list[float]] = defaultdict(list)
    for rating in ratings:
        if rating.score is not None:
            scores[rating.completion_id].append(rating.score)
    return {cid: sum(values) / len(values) for cid, values in scores.items()}


def supervised(completions: Sequence[StoredCompletion], ratings: Sequence[Rating], *, min_score: float = 0.5,
               view: PromptView = "conversation") -> list[Line]:
    """Good answers as they were, and corrected answers in place of the ones they correct."""
    scores = mean_scores(ratings)
    corrections: dict[str, Rating] = {}
    for rating in sorted(ratings, key=lambda r: (r.updated, r.id)):
        if rating.corrected:
            corrections[rating.completion_id] = rating
    lines = []
    for record in completions:
        fixed = corrections.get(record.id)
        if fixed is not None:
            lines.append(supervised_line(prompt_of(record, view), fixed.corrected or "", "corrected", [record.id],
                                         ratings=[fixed.id]))
        elif record.id in scores and scores[record.id] >= min_score and record.answer():
            used = [r.id for r in ratings if r.completion_id == record.id and r.score is not None]
            lines.append(supervised_line(prompt_of(record, view), record.answer(), "rated", [record.id],
                                         ratings=used, score=round(scores[record.id], 6)))
    return lines


def preferences(completions: Sequence[StoredCompletion], ratings: Sequence[Rating], pairs: Sequence[Preference], *,
                margin: float = 0.5, view: PromptView = "conversation") -> list[Line]:
    """Stated preferences first, then rated pairs: per prompt, best vs worst when `margin` apart."""
    by_id = {record.id: record for record in completions}
    lines, paired = [], set()
    for pair in pairs:
        chosen, rejected = by_id.get(pair.chosen), by_id.get(pair.rejected)
        if chosen is None or rejected is None or chosen.answer() == rejected.answer():
            continue  # one side is outside the selection, or there is nothing to learn
        paired.add(frozenset((chosen.id, rejected.id)))
        lines.append(preference_line(prompt_of(chosen, view), chosen.answer(), rejected.answer(), "preferred",
                                     [chosen.id, rejected.id], preferences=[pair.id]))
    scores = mean_scores(ratings)
    groups: dict[str, list[StoredCompletion]] = defaultdict(list)
    for record in completions:
        if record.id in scores:
            groups[record.prompt_hash].append(record)
    for group in groups.values():
        ranked = sorted(group, key=lambda r: (-scores[r.id], r.created, r.id))
        best, worst = ranked[0], ranked[-1]
        if (scores[best.id] - scores[worst.id] >= margin and frozenset((best.id, worst.id)) not in paired
                and best.answer() != worst.answer()):
            lines.append(preference_line(prompt_of(best, view), best.answer(), worst.answer(), "rated_pair",
                                         [best.id, worst.id], scores=[scores[best.id], scores[worst.id]]))
    return lines


def best_of_n(prompt: list[dict[str, Any]], answers: Sequence[str], scores: Sequence[float | None], *,
              margin: float, completion: str, grader: str) -> Line | None:
    """The best- and worst-graded of n sampled answers as a preference pair, when `margin` apart."""
    graded = [(score, i) for i, score in enumerate(scores) if score is not None]
    if len(graded) < 2:
        return None
    best = max(graded, key=lambda si: (si[0], -si[1]))
    worst = min(graded, key=lambda si: (si[0], si[1]))
    if best[0] - worst[0] < margin or answers[best[1]] == answers[worst[1]]:
        return None
    return preference_line(prompt, answers[best[1]], answers[worst[1]], "best_of_n", [completion], grader=grader,
                           n=len(answers), scores=[best[0], worst[0]])


def split_holdout(items: Sequence[Any], fraction: float, seed: int, key: Any = None) -> tuple[list[Any], list[Any]]:
    """A seeded split: the same items and seed always hold out the same ones (by a hash of each key)."""
    if fraction <= 0:
        return list(items), []
    train: list[Any] = []
    held: list[Any] = []
    for item in items:
        name = str(key(item) if key else item)
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < fraction else train).append(item)
    return train, held
