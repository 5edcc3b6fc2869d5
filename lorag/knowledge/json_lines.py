"""JSON Lines read strictly: one object a line, every problem naming the file and the line.

Corpus files and judged query sets share it: both are refused whole, before anything runs
or is written, so a typo never turns into a half-ingested base or a silently worse score.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from lorag.errors import LoragError


def json_objects(text: str, label: str, error: type[LoragError], param: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(N, `label line N`, object) for each non-blank line; `error` for a line that is not a JSON object."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{label} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}: not valid JSON ({err.msg})", param=param) from None
        if not isinstance(record, dict):
            raise error(f"{where}: expected a JSON object", param=param)
        yield number, where, record
