"""JSONL files checked line by line: every problem collected with its line, then reported together.

The reader and the message checks that training data (supervised and preference) and
evaluation sets share; nothing here needs a tokenizer, so a server can check a file the
moment it is uploaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lorag.errors import LoragError

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_LISTED_PROBLEMS = 10


class DataFileError(LoragError):
    """A JSONL file that cannot be used; the message lists the lines and what is wrong."""

    code = "invalid_data"
    what = "data"  # "<path>: N problems in the <what>:"
    noun = "records"  # "the file holds no <noun>"

    def __init__(self, path: Path, problems: list[str]) -> None:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        lines = [f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the {self.what}:"]
        lines += [f"  {p}" for p in shown]
        if more:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))
        self.path = path
        self.problems = problems


class TrainingDataError(DataFileError):
    """The data file cannot be trained on."""

    code = "invalid_training_data"
    what = "training data"
    noun = "examples"


class LineError(Exception):
    """What is wrong with one line (collected, then reported together)."""


T = TypeVar("T")


def file_digest(path: Path) -> str:
    """sha256 of the file: a checkpoint may only be resumed on the data it was trained on."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: Path, parse: Callable[[dict[str, Any], int], T], error: type[DataFileError]) -> list[T]:
    """Each non-blank line of `path`, a JSON object, through `parse(record, line)`.

    `parse` raises LineError for what is wrong with its line; every problem in the file is
    collected and raised together as `error`, so one run shows them all.
    """
    if not path.is_file():
        raise LoragError(f"{error.what[:1].upper()}{error.what[1:]} {path} does not exist (or is not a file).")
    problems: list[str] = []
    items: list[T] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.append(f"line {number}: not UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not text.strip():
                continue
            try:
                items.append(parse(_json_object(text), number))
            except LineError as err:
                problems.append(f"line {number}: {err}")
    if not items and not problems:
        problems.append(f"the file holds no {error.noun} (every line is empty)")
    if problems:
        raise error(path, problems)
    return items


def _json_object(text: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise LineError(f"not valid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(record, dict):
        raise LineError(f"expected a JSON object, got {type(record).__name__}")
    return record


def check_messages(value: object, key: str) -> tuple[list[dict[str, str]], list[bool]]:
    """Check a list of chat messages; return them (role and content only) and which are trained.

    An assistant message is trained unless it carries `"weight": 0` (context only).
    """
    if not isinstance(value, list) or not value:
        raise LineError(f"'{key}' must be a non-empty list of messages")
    messages: list[dict[str, str]] = []
    trained: list[bool] = []
    for index, message in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise LineError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role is None:
            raise LineError(f"{where} has no 'role'")
        if role not in ROLES:
            raise LineError(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            what = "no 'content'" if content is None else f"a {type(content).__name__} 'content'"
            raise LineError(f"{where} ({role}) has {what}; it must be a string")
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise LineError(f"{where} has weight {weight!r}; use 0 (context only) or 1 (trained)")
        messages.append({"role": role, "content": content})
        trained.append(role == "assistant" and weight == 1)
    return messages, trained
