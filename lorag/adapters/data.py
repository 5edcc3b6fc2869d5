"""Training data: a JSONL file -> tokenized examples whose labels cover only what the model should say.

Two shapes per line (the ones TRL and OpenAI fine-tuning use):

- chat: `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}`,
  rendered with the base model's own chat template, so training sees exactly the prompt
  the server builds; loss on the assistant turns (an assistant message with
  `"weight": 0` is context only);
- prompt/completion: `{"prompt": "...", "completion": "..."}` as raw text (for
  /v1/completions; the completion is followed by the EOS token so the adapter learns to
  stop), or with lists of messages for both (chat; loss on the completion's turns).

Everything is checked before any training starts, and every problem names its line:
a run must not die at step 900 on a typo in line 7.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lorag.errors import LoragError

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_LISTED_PROBLEMS = 10
IGNORE = -100  # label of a token the loss skips (the value torch's cross_entropy ignores)


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


@dataclass(frozen=True)
class Example:
    """One tokenized example: `labels` is `input_ids` with every prompt token set to IGNORE."""

    line: int
    input_ids: list[int]
    labels: list[int]


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


def load_examples(path: Path, tokenizer: Any, max_length: int) -> list[Example]:
    """Read, check and tokenize every line of `path`; raise TrainingDataError listing all problems."""

    def example(record: dict[str, Any], number: int) -> Example:
        tokenized = _tokenize(_parse(record), tokenizer, number)
        if len(tokenized.input_ids) > max_length:
            raise LineError(f"{len(tokenized.input_ids)} tokens, longer than max length {max_length} "
                            "(shorten it, split it, or raise --max-length)")
        return tokenized

    return read_jsonl(path, example, TrainingDataError)


# -- one line -> a normalised example ------------------------------------------------


@dataclass(frozen=True)
class _Parsed:
    """A chat (messages + which of them are trained) or raw text (prompt + completion)."""

    messages: list[dict[str, str]] | None = None
    trained: list[bool] | None = None
    prompt: str | None = None
    completion: str | None = None


def _parse(record: dict[str, Any]) -> _Parsed:
    has_messages = "messages" in record
    has_pair = "prompt" in record or "completion" in record
    if has_messages and has_pair:
        raise LineError("has both 'messages' and 'prompt'/'completion'; use one shape per line")
    if has_messages:
        messages, trained = _messages(record["messages"], "messages")
        if not any(trained):
            raise LineError("no assistant message to train on (add one with role 'assistant')")
        return _Parsed(messages=messages, trained=trained)
    if not has_pair:
        raise LineError("needs 'messages' (chat) or 'prompt' and 'completion'")
    for key in ("prompt", "completion"):
        if key not in record:
            raise LineError(f"has no '{key}'")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise LineError("'completion' is empty")
        return _Parsed(prompt=prompt, completion=completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        before, _ = _messages(prompt, "prompt")
        after, trained = _messages(completion, "completion")
        if not after or any(m["role"] != "assistant" for m in after):
            raise LineError("'completion' must hold assistant messages only")
        return _Parsed(messages=before + after, trained=[False] * len(before) + trained)
    raise LineError("'prompt' and 'completion' must both be strings, or both lists of messages")


def _messages(value: object, key: str) -> tuple[list[dict[str, str]], list[bool]]:
    """Check a list of messages; return them (role and content only) and which are trained."""
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


# -- normalised example -> token ids and labels ---------------------------------------


def _tokenize(parsed: _Parsed, tokenizer: Any, line: int) -> Example:
    if parsed.messages is not None and parsed.trained is not None:
        segments = _chat_segments(parsed.messages, parsed.trained, tokenizer)
        ids: list[int] = []
        labels: list[int] = []
        for text, is_trained in segments:
            piece = list(tokenizer.encode(text, add_special_tokens=False)) if text else []
            ids += piece
            labels += piece if is_trained else [IGNORE] * len(piece)
    else:
        # As the server tokenizes a text prompt (special tokens included), then the completion.
        prompt_ids = list(tokenizer.encode(parsed.prompt or ""))
        answer = list(tokenizer.encode(parsed.completion or "", add_special_tokens=False))
        eos = tokenizer.eos_token_id
        if eos is not None and (not answer or answer[-1] != eos):
            answer.append(eos)
        ids = prompt_ids + answer
        labels = [IGNORE] * len(prompt_ids) + answer
    if not any(label != IGNORE for label in labels):
        raise LineError("the trained part is empty after tokenization")
    return Example(line=line, input_ids=ids, labels=labels)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises its own types (e.g. "roles must alternate")
        raise LineError(f"the model's chat template refuses these messages: {err}") from None
    return str(text)


def _chat_segments(messages: list[dict[str, str]], trained: list[bool], tokenizer: Any) -> list[tuple[str, bool]]:
    """Cut the rendered chat into (text, trained) pieces.

    A trained piece runs from the end of the generation prompt before an assistant turn to
    the end of that turn as the template writes it (end-of-turn token included, so the
    adapter learns to stop); the prompt is tokenized on its own, as the server does.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise LineError("the base model's tokenizer has no chat template; use prompt/completion text")
    full = _render(tokenizer, messages, generation_prompt=False)
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for index, is_trained in enumerate(trained):
        if not is_trained:
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        upto = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= cursor):
            raise LineError(
                "the model's chat template does not render this conversation as a growing prefix "
                f"(at message {index}); put one assistant turn per example"
            )
        segments += [(full[cursor : len(before)], False), (full[len(before) : len(upto)], True)]
        cursor = len(upto)
    segments.append((full[cursor:], False))
    return segments
