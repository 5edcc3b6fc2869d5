"""Metadata filters: one syntax (Chroma's `where`) for vector and keyword search alike.

`{"source": "/docs/a.md"}`, `{"page": {"$gte": 2}}`, `{"file_type": ["pdf", "md"]}`
(a list means $in) and several keys at once (an implicit $and) are accepted; the
same filter is handed to Chroma and evaluated here for BM25, so both modes agree.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from lorag.errors import LoragError

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "$eq": lambda a, b: a == b,
    "$ne": lambda a, b: a != b,
    "$gt": lambda a, b: a is not None and a > b,
    "$gte": lambda a, b: a is not None and a >= b,
    "$lt": lambda a, b: a is not None and a < b,
    "$lte": lambda a, b: a is not None and a <= b,
    "$in": lambda a, b: a in b,
    "$nin": lambda a, b: a not in b,
}
_LOGICAL = ("$and", "$or")


def _bad(message: str) -> LoragError:
    return LoragError(f"invalid filters: {message}", param="filters")


def normalize(filters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chroma's strict form: one key per dict, explicit operators, $and for several keys."""
    if not filters:
        return None
    if not isinstance(filters, dict):
        raise _bad("expected an object such as {\"source\": \"...\"}")
    clauses = []
    for key, value in filters.items():
        if key in _LOGICAL:
            if not isinstance(value, list) or not value:
                raise _bad(f"{key} takes a non-empty list of filters")
            parts = [normalize(v) for v in value]
            if len(parts) == 1:
                clauses.append(parts[0])
            else:
                clauses.append({key: parts})
        elif key.startswith("$"):
            raise _bad(f"unknown operator {key}")
        else:
            clauses.append({key: _condition(key, value)})
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _condition(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, list):
        return {"$in": _scalars(key, value)}
    if isinstance(value, dict):
        if len(value) != 1:
            raise _bad(f"{key}: one operator per condition, e.g. {{\"$gte\": 2}}")
        op, operand = next(iter(value.items()))
        if op not in _COMPARE:
            raise _bad(f"{key}: unknown operator {op} (use {', '.join(_COMPARE)})")
        if op in ("$in", "$nin"):
            if not isinstance(operand, list) or not operand:
                raise _bad(f"{key}: {op} takes a non-empty list")
            return {op: _scalars(key, operand)}
        return {op: _scalars(key, [operand])[0]}
    return {"$eq": _scalars(key, [value])[0]}


def _scalars(key: str, values: list[Any]) -> list[Any]:
    for value in values:
        if not isinstance(value, (str, int, float, bool)):
            raise _bad(f"{key}: values must be strings, numbers or booleans")
    return values


def matcher(where: dict[str, Any] | None) -> Callable[[dict[str, Any]], bool]:
    """A predicate over chunk metadata for a normalized filter."""
    if not where:
        return lambda meta: True
    key, value = next(iter(where.items()))
    if key == "$and":
        parts = [matcher(v) for v in value]
        return lambda meta: all(p(meta) for p in parts)
    if key == "$or":
        parts = [matcher(v) for v in value]
        return lambda meta: any(p(meta) for p in parts)
    op, operand = next(iter(value.items()))
    compare = _COMPARE[op]

    def check(meta: dict[str, Any]) -> bool:
        if key not in meta:
            return op in ("$ne", "$nin")
        try:
            return compare(meta[key], operand)
        except TypeError:
            return False

    return check


class FilterMasks:
    """Per-filter masks over a fixed list of chunk metadata, cached (a few filters repeat a lot).

    The exact vector index and the keyword index both filter in numpy; one cache serves both.
    """

    MAX_CACHED = 64

    def __init__(self, metadatas: list[dict[str, Any]], dtype: Any) -> None:
        self.metadatas = metadatas
        self.dtype = dtype
        self._masks: dict[str, Any] = {}
        self._guard = threading.Lock()

    def get(self, where: dict[str, Any]) -> Any:
        """A numpy array, one entry per chunk: whether it matches `where` (in `dtype`)."""
        import numpy as np

        key = json.dumps(where, sort_keys=True)
        with self._guard:
            mask = self._masks.get(key)
            if mask is None:
                check = matcher(where)
                mask = np.fromiter((check(m) for m in self.metadatas), dtype=self.dtype, count=len(self.metadatas))
                if len(self._masks) > self.MAX_CACHED:
                    self._masks.clear()
                self._masks[key] = mask
            return mask
