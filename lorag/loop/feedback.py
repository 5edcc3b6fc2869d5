"""Feedback on stored completions: a rating (score or thumbs, a corrected answer, a comment) and a
pairwise preference between two answers to the same prompt. Both are idempotent per key: the same
key rating the same completion again, or preferring within the same pair again, replaces its
earlier word (same id) instead of adding a second vote.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lorag.errors import LoragError
from lorag.loop.completions import CompletionStore
from lorag.loop.database import LoopDatabase

Thumbs = Literal["up", "down"]
MAX_TEXT = 32_768


@dataclass(frozen=True)
class Rating:
    id: str
    completion_id: str
    owner: str
    score: float | None
    corrected: str | None
    comment: str | None
    created: int
    updated: int

    def to_api(self) -> dict[str, Any]:
        return {"object": "chat.completion.rating", **_api_fields(asdict(self))}


@dataclass(frozen=True)
class Preference:
    id: str
    chosen: str
    rejected: str
    owner: str
    comment: str | None
    created: int
    updated: int

    def to_api(self) -> dict[str, Any]:
        return {"object": "chat.completion.preference", **_api_fields(asdict(self))}


def _api_fields(fields: dict[str, Any]) -> dict[str, Any]:
    fields["created_at"], fields["updated_at"] = fields.pop("created"), fields.pop("updated")
    fields["key"] = fields.pop("owner")
    return fields


def rating_score(score: float | None, thumbs: Thumbs | None) -> float | None:
    """One number in [-1, 1]: the score, or thumbs up (1) / down (-1); never both."""
    if score is not None and thumbs is not None:
        raise LoragError("Send `score` or `thumbs`, not both.", param="score")
    if thumbs is not None:
        if thumbs not in ("up", "down"):
            raise LoragError("`thumbs` is 'up' or 'down'.", param="thumbs")
        return 1.0 if thumbs == "up" else -1.0
    if score is not None and not -1.0 <= score <= 1.0:
        raise LoragError(f"`score` must lie in [-1, 1]; got {score}.", param="score")
    return score


def _text(value: str | None, param: str) -> str | None:
    if value is not None and len(value) > MAX_TEXT:
        raise LoragError(f"`{param}` is longer than {MAX_TEXT} characters.", param=param)
    return value


class FeedbackStore:
    """Ratings and preferences in the loop database, next to the completions they are about."""

    def __init__(self, db: LoopDatabase, completions: CompletionStore) -> None:
        self.db = db
        self.completions = completions

    def rate(self, completion_id: str, owner: str, *, viewer: str | None, score: float | None = None,
             thumbs: Thumbs | None = None, corrected: str | None = None, comment: str | None = None) -> Rating:
        """Set `owner`'s rating of a completion `viewer` may see (None: an admin, every one)."""
        self.completions.get(completion_id, viewer)
        value = rating_score(score, thumbs)
        if value is None and corrected is None and comment is None:
            raise LoragError("A rating needs a `score` (or `thumbs`), a `corrected` answer or a `comment`.",
                             param="score")
        now = int(time.time())
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO ratings (id, completion_id, owner, score, corrected, comment, created, updated) "
                "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (completion_id, owner) DO UPDATE SET score = excluded.score, "
                "corrected = excluded.corrected, comment = excluded.comment, updated = excluded.updated",
                (f"rating-{uuid.uuid4().hex}", completion_id, owner, value, _text(corrected, "corrected"),
                 _text(comment, "comment"), now, now))
        return self._rating(completion_id, owner)

    def ratings(self, completion_ids: list[str] | None = None, owner: str | None = None) -> list[Rating]:
        """Ratings (of these completions; by this key), oldest first."""
        where, params = _scope(("completion_id",), completion_ids, owner)
        return [Rating(**_fields(row)) for row in self.db.rows(f"SELECT * FROM ratings WHERE {where} ORDER BY seq",
                                                                params)]

    def prefer(self, chosen: str, rejected: str, owner: str, *, viewer: str | None,
               comment: str | None = None) -> Preference:
        """`chosen` is the better answer to the prompt both completions answered."""
        if chosen == rejected:
            raise LoragError("`chosen` and `rejected` must be two different completions.", param="rejected")
        better, worse = self.completions.get(chosen, viewer), self.completions.get(rejected, viewer)
        if better.prompt_hash != worse.prompt_hash:
            raise LoragError(f"{chosen} and {rejected} answer different prompts (model or conversation differ); "
                             "a preference compares two answers to the same one.", param="rejected")
        pair = "|".join(sorted((chosen, rejected)))
        now = int(time.time())
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO preferences (id, chosen, rejected, pair, owner, comment, created, updated) "
                "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (pair, owner) DO UPDATE SET chosen = excluded.chosen, "
                "rejected = excluded.rejected, comment = excluded.comment, updated = excluded.updated",
                (f"pref-{uuid.uuid4().hex}", chosen, rejected, pair, owner, _text(comment, "comment"), now, now))
        rows = self.db.rows("SELECT * FROM preferences WHERE pair = ? AND owner = ?", (pair, owner))
        return Preference(**_fields(rows[0], drop=("pair",)))

    def preferences(self, completion_ids: list[str] | None = None, owner: str | None = None) -> list[Preference]:
        """Preferences (touching these completions; by this key), oldest first."""
        where, params = _scope(("chosen", "rejected"), completion_ids, owner)
        rows = self.db.rows(f"SELECT * FROM preferences WHERE {where} ORDER BY seq", params)
        return [Preference(**_fields(row, drop=("pair",))) for row in rows]

    def _rating(self, completion_id: str, owner: str) -> Rating:
        rows = self.db.rows("SELECT * FROM ratings WHERE completion_id = ? AND owner = ?", (completion_id, owner))
        return Rating(**_fields(rows[0]))


def _scope(columns: tuple[str, ...], ids: list[str] | None, owner: str | None) -> tuple[str, list[Any]]:
    """A WHERE clause: any of `columns` among `ids`, and written by `owner` (None: no filter)."""
    where, params = ["1 = 1"], []
    if ids is not None and not ids:
        where.append("1 = 0")  # `IN ()` is SQLite's only
    elif ids is not None:
        marks = ",".join("?" * len(ids))
        where.append("(" + " OR ".join(f"{column} IN ({marks})" for column in columns) + ")")
        params.extend(ids * len(columns))
    if owner is not None:
        where.append("owner = ?")
        params.append(owner)
    return " AND ".join(where), params


def _fields(row: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {key: row[key] for key in row.keys() if key != "seq" and key not in drop}  # noqa: SIM118 (a Row iterates values)
