"""The evaluation set: a JSONL file, one question a line, checked whole before anything runs.

    {"question": "What notice must a tenant give?",
     "answer": "Thirty days, in writing.",            # or a list of acceptable answers
     "sources": ["lease-act.pdf"],                     # optional: relevant sources (file name or full path)
     "schema": {"type": "object", ...},                # optional: JSON schema the answer must satisfy
     "domain": "legal",                                # optional: the domain this question is for
     "subset": "knowledge",                            # optional: a group reported on its own (per-subset rows)
     "format": "Short answer: [^\\n]+\\nWhy: [^\\n]+",   # optional: regex the whole (stripped) answer must match
     "id": "q17"}                                      # optional: a name for the item in the results

Problems are reported with their line, the way training data problems are (the same
reader, lorag.adapters.data.read_jsonl): an evaluation that runs for an hour must not
die on a typo in line 40.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorag.adapters.data import DataFileError, LineError, read_jsonl

FIELDS = ("question", "answer", "sources", "schema", "domain", "subset", "format", "id")
# The report's name for every item together: no subset may take it.
ALL = "all"


class EvalDataError(DataFileError):
    """The evaluation file cannot be used."""

    code = "invalid_eval_data"
    what = "evaluation data"
    noun = "questions"


@dataclass(frozen=True)
class EvalItem:
    """One question with what a right answer looks like."""

    line: int
    question: str
    answers: tuple[str, ...]  # acceptable reference answers (at least one)
    sources: tuple[str, ...] = ()  # relevant sources; empty: retrieval is not scored for this item
    schema: dict[str, Any] | None = None
    domain: str | None = None
    id: str = ""
    subset: str | None = None  # a group of items reported on its own, besides all items together
    format: str | None = None  # a regular expression the whole answer (stripped) must match


    @property
    def name(self) -> str:
        return self.id or f"line {self.line}"

    def fields(self) -> dict[str, Any]:
        """What a grader's `{{item.X}}` may name: the line's fields that are set, `answers` (every
        reference), `answer` and `reference` (the first one)."""
        found: dict[str, Any] = {"question": self.question, "answer": self.answers[0],
                                 "reference": self.answers[0], "answers": list(self.answers), "line": self.line}
        optional = {"sources": list(self.sources), "schema": self.schema, "domain": self.domain, "id": self.id,
                    "subset": self.subset, "format": self.format}
        return found | {key: value for key, value in optional.items() if value}


def load_eval_set(path: Path) -> list[EvalItem]:
    """Every item of `path`; EvalDataError lists every bad line."""
    return read_jsonl(path, _item, EvalDataError)


def _item(record: dict[str, Any], line: int) -> EvalItem:
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise LineError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"expected {', '.join(FIELDS)}")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise LineError("has no 'question'" if question is None else "'question' must be a non-empty string")
    return EvalItem(
        line=line,
        question=question,
        answers=_answers(record.get("answer")),
        sources=_strings(record.get("sources"), "sources"),
        schema=_schema(record.get("schema")),
        domain=_optional_string(record.get("domain"), "domain"),
        id=_optional_string(record.get("id"), "id") or "",
        subset=_subset(record.get("subset")),
        format=_format(record.get("format")),
    )


def _answers(value: object) -> tuple[str, ...]:
    if value is None:
        raise LineError("has no 'answer' (the reference answer)")
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise LineError("'answer' must be a string or a non-empty list of strings")


def _strings(value: object, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise LineError(f"'{key}' must be a list of non-empty strings")


def _optional_string(value: object, key: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    raise LineError(f"'{key}' must be a non-empty string")


def _subset(value: object) -> str | None:
    subset = _optional_string(value, "subset")
    if subset == ALL:
        raise LineError(f"'subset' may not be '{ALL}' (the report's name for all items together)")
    return subset


def _format(value: object) -> str | None:
    pattern = _optional_string(value, "format")
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise LineError(f"'format' is not a valid regular expression: {err}") from None
    return pattern


def _schema(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LineError("'schema' must be a JSON schema object")
    import jsonschema

    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as err:
        where = "/".join(str(p) for p in err.path)
        raise LineError(f"'schema' is not a valid JSON schema: {err.message}"
                        + (f" (at {where})" if where else "")) from None
    return value
