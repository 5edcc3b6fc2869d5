"""Preference data for DPO, in OpenAI's fine-tuning format: one prompt, a preferred and a rejected answer.

    {"input": {"messages": [{"role": "user", "content": "..."}]},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

`preferred_completion` / `non_preferred_completion` are accepted for the two outputs too.
Parsing only (no tokenizer), so a server can check an upload at once; lorag.adapters.data
tokenizes the result exactly as it tokenizes chat examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorag.adapters.records import LineError, check_messages

# (key, alias, what it is): the two answers of a preference line.
CHOSEN = ("preferred_output", "preferred_completion", "the preferred answer")
REJECTED = ("non_preferred_output", "non_preferred_completion", "the rejected answer")


@dataclass(frozen=True)
class Preference:
    """The conversation so far, and the assistant message preferred to come next over the rejected one."""

    prompt: list[dict[str, str]]
    chosen: dict[str, str]
    rejected: dict[str, str]


def parse_preference(record: dict[str, Any]) -> Preference:
    """Check one line's shape; LineError says what is wrong."""
    if "input" not in record:
        raise LineError("has no 'input' (a preference example needs the prompt: {\"input\": {\"messages\": [...]}})")
    given = record["input"]
    if not isinstance(given, dict) or "messages" not in given:
        raise LineError("'input' must be an object with 'messages'")
    prompt, _ = check_messages(given["messages"], "input.messages")
    chosen = _answer(record, *CHOSEN)
    rejected = _answer(record, *REJECTED)
    if chosen == rejected:
        raise LineError("the preferred and the non-preferred answers are the same (nothing to learn)")
    return Preference(prompt=prompt, chosen=chosen, rejected=rejected)


def _answer(record: dict[str, Any], key: str, alias: str, what: str) -> dict[str, str]:
    if key in record and alias in record:
        raise LineError(f"has both '{key}' and '{alias}'; give {what} once")
    if key not in record and alias not in record:
        raise LineError(f"has no '{key}' (a preference example needs {what})")
    name = key if key in record else alias
    messages, trained = check_messages(record[name], name)
    if len(messages) != 1 or not trained[0]:
        raise LineError(f"'{name}' must hold exactly one assistant message ({what})")
    return messages[0]
