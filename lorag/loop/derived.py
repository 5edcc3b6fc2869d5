"""Which training files were made from which stored completions, so a deletion reaches them.

Deleting a stored completion (a user's request, its retention running out) also takes the lines
made from it out of every training file still stored; a job that already copied a file keeps its
copy (what was trained is not untrained; docs/loop.md says so).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from lorag.loop.database import LoopDatabase
from lorag.loop.training_data import PROVENANCE


def record_derived(db: LoopDatabase, file_id: str, completion_ids: Iterable[str]) -> None:
    with db.transaction() as conn:
        conn.executemany("INSERT INTO derived (file_id, completion_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                         [(file_id, cid) for cid in set(completion_ids)])


def files_from(db: LoopDatabase, completion_id: str) -> list[str]:
    """The training files that hold lines made from `completion_id`."""
    return [row["file_id"] for row in db.rows("SELECT file_id FROM derived WHERE completion_id = ? ORDER BY file_id",
                                              (completion_id,))]


def forget(db: LoopDatabase, completion_id: str) -> None:
    with db.transaction() as conn:
        conn.execute("DELETE FROM derived WHERE completion_id = ?", (completion_id,))


def without_completion(content: bytes, completion_id: str) -> tuple[bytes, int]:
    """A JSONL training file without the lines whose provenance names `completion_id`; and how many went."""
    kept, dropped = [], 0
    for raw in content.splitlines(keepends=True):
        try:
            origin = json.loads(raw).get(PROVENANCE, {})
        except (ValueError, AttributeError):
            kept.append(raw)
            continue
        if completion_id in origin.get("completions", []):
            dropped += 1
        else:
            kept.append(raw)
    return b"".join(kept), dropped
