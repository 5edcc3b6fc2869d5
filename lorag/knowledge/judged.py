"""Judged query sets: BEIR's queries.jsonl and qrels TSV, read strictly.

Every problem is one line naming the file and the line (`qrels.tsv line 7: ...`), raised
before any query runs, so a typo never turns into a silently worse score.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from lorag.errors import LoragError
from lorag.knowledge.json_lines import json_objects


class JudgedSetError(LoragError):
    code = "invalid_judged_set"


@dataclass
class JudgedSet:
    queries: dict[str, str]  # query id -> text (only the judged ones)
    qrels: dict[str, dict[str, int]]  # query id -> document ref -> grade
    lines: dict[tuple[str, str], int] = field(default_factory=dict)  # (query, doc) -> qrels line


def read_queries(text: str, label: str = "queries.jsonl") -> dict[str, str]:
    """`{"_id": ..., "text": ...}` per line (`id` and `query` are accepted too)."""
    queries: dict[str, str] = {}
    for _number, where, record in json_objects(text, label, JudgedSetError, "queries"):
        qid = record.get("_id", record.get("id"))
        query = record.get("text", record.get("query"))
        if qid is None or isinstance(qid, (dict, list)) or not str(qid).strip():
            raise JudgedSetError(f"{where}: no '_id'", param="queries")
        if not isinstance(query, str) or not query.strip():
            raise JudgedSetError(f"{where}: no query 'text'", param="queries")
        if str(qid) in queries:
            raise JudgedSetError(f"{where}: duplicate query id {str(qid)!r}", param="queries")
        queries[str(qid).strip()] = query
    if not queries:
        raise JudgedSetError(f"{label}: no queries (an empty file)", param="queries")
    return queries


def read_qrels(text: str, label: str = "qrels.tsv") -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], int]]:
    """BEIR's `query-id<TAB>corpus-id<TAB>score` (a header line is allowed) or TREC's
    `query-id 0 doc-id grade`; returns the judgements and the line of each."""
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{label} line {number}"
        parts = line.split("\t") if "\t" in line else line.split()
        parts = [p.strip() for p in parts]
        if len(parts) == 4:
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise JudgedSetError(
                f"{where}: expected 'query-id<TAB>doc-id<TAB>grade' (or TREC's 4 columns), got {line.strip()[:80]!r}",
                param="qrels",
            )
        qid, doc, raw = parts
        grade = _grade(raw)
        if grade is None:
            if not qrels and number == _first_line(text):
                continue  # the header BEIR writes
            raise JudgedSetError(f"{where}: grade {raw!r} is not a whole number", param="qrels")
        if (qid, doc) in lines:
            raise JudgedSetError(f"{where}: {qid}/{doc} judged twice (first on line {lines[(qid, doc)]})", param="qrels")
        qrels.setdefault(qid, {})[doc] = grade
        lines[(qid, doc)] = number
    if not qrels:
        raise JudgedSetError(f"{label}: no judgements (an empty file)", param="qrels")
    return qrels, lines


def _grade(raw: str) -> int | None:
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        value = float(raw)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _first_line(text: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), start=1) if line.strip())


def load(
    queries_text: str,
    qrels_text: str,
    *,
    documents: Collection[str] | None = None,
    allow_unknown_documents: bool = False,
    queries_label: str = "queries.jsonl",
    qrels_label: str = "qrels.tsv",
) -> JudgedSet:
    """Queries and judgements checked against each other and, given `documents`, against
    the knowledge base: a judgement of an unknown query or document is an error naming its
    line (unknown documents may be allowed: they then count as relevant, never found)."""
    queries = read_queries(queries_text, queries_label)
    qrels, lines = read_qrels(qrels_text, qrels_label)
    for (qid, doc), number in sorted(lines.items(), key=lambda item: item[1]):
        if qid not in queries:
            raise JudgedSetError(f"{qrels_label} line {number}: query {qid!r} is not in {queries_label}", param="qrels")
        if documents is not None and not allow_unknown_documents and doc not in documents:
            raise JudgedSetError(
                f"{qrels_label} line {number}: document {doc!r} is not in the knowledge base", param="qrels"
            )
    judged = {qid: queries[qid] for qid in qrels if any(g > 0 for g in qrels[qid].values())}
    if not judged:
        raise JudgedSetError(f"{qrels_label}: no query has a relevant document (grade > 0)", param="qrels")
    return JudgedSet(queries=judged, qrels={q: qrels[q] for q in judged}, lines=lines)


def load_files(
    queries_path: Path,
    qrels_path: Path,
    *,
    documents: Collection[str] | None = None,
    allow_unknown_documents: bool = False,
) -> JudgedSet:
    """`load` on two files (their names label the errors)."""
    texts = []
    for path in (queries_path, qrels_path):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise JudgedSetError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    return load(
        texts[0],
        texts[1],
        documents=documents,
        allow_unknown_documents=allow_unknown_documents,
        queries_label=queries_path.name,
        qrels_label=qrels_path.name,
    )
