"""Training data: a JSONL file -> tokenized examples whose labels cover only what the model should say.

Two shapes per line (the ones TRL and OpenAI fine-tuning use):

- chat: `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}`,
  rendered with the base model's own chat template, so training sees exactly the prompt
  the server builds; loss on the assistant turns (an assistant message with
  `"weight": 0` is context only);
- prompt/completion: `{"prompt": "...", "completion": "..."}` as raw text (for
  /v1/completions; the completion is followed by the EOS token so the adapter learns to
  stop), or with lists of messages for both (chat; loss on the completion's turns).

DPO's preference lines (lorag.adapters.preference) are tokenized the same way: the prompt
as the server renders it, each answer as the chat template continues it.

Everything is checked before any training starts, and every problem names its line:
a run must not die at step 900 on a typo in line 7. `check_training_file` runs the same
parsing without a tokenizer, for a server to check an upload at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lorag.adapters.preference import Preference, parse_preference
from lorag.adapters.records import DataFileError as DataFileError
from lorag.adapters.records import LineError, TrainingDataError, check_messages, read_jsonl
from lorag.adapters.records import file_digest as file_digest

# DataFileError and file_digest are re-exported: evaluation and fine-tuning import them from here.
IGNORE = -100  # label of a token the loss skips (the value torch's cross_entropy ignores)
Method = Literal["supervised", "dpo"]


@dataclass(frozen=True)
class Example:
    """One tokenized example: `labels` is `input_ids` with every prompt token set to IGNORE."""

    line: int
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Pair:
    """One tokenized preference: the same prompt followed by the chosen and by the rejected answer.

    `reference`: the reference model's log-probabilities of the two answers (DPO sets them
    once before training).
    """

    line: int
    chosen: Example
    rejected: Example
    reference: tuple[float, float] | None = None


def check_training_file(path: Path, method: Method) -> int:
    """The number of examples in `path`, checked for shape only (no tokenizer); TrainingDataError lists problems by line."""
    parse = parse_example if method == "supervised" else parse_preference
    return len(read_jsonl(path, lambda record, _line: parse(record), TrainingDataError))


def load_examples(path: Path, tokenizer: Any, max_length: int) -> list[Example]:
    """Read, check and tokenize every line of `path`; raise TrainingDataError listing all problems."""

    def example(record: dict[str, Any], number: int) -> Example:
        tokenized = tokenize_example(parse_example(record), tokenizer, number)
        check_length(len(tokenized.input_ids), max_length)
        return tokenized

    return read_jsonl(path, example, TrainingDataError)


def load_pairs(path: Path, tokenizer: Any, max_length: int) -> list[Pair]:
    """Read, check and tokenize every preference line of `path`, as load_examples does chat lines."""

    def pair(record: dict[str, Any], number: int) -> Pair:
        tokenized = tokenize_preference(parse_preference(record), tokenizer, number)
        check_length(max(len(tokenized.chosen.input_ids), len(tokenized.rejected.input_ids)), max_length)
        return tokenized

    return read_jsonl(path, pair, TrainingDataError)


def check_length(tokens: int, max_length: int) -> None:
    if tokens > max_length:
        raise LineError(f"{tokens} tokens, longer than max length {max_length} "
                        "(shorten it, split it, or raise --max-length)")


# -- one line -> a normalised example ------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    """A chat (messages + which of them are trained) or raw text (prompt + completion)."""

    messages: list[dict[str, str]] | None = None
    trained: list[bool] | None = None
    prompt: str | None = None
    completion: str | None = None


def parse_example(record: dict[str, Any]) -> Parsed:
    """Check one supervised line's shape (chat or prompt/completion); LineError says what is wrong."""
    has_messages = "messages" in record
    has_pair = "prompt" in record or "completion" in record
    if has_messages and has_pair:
        raise LineError("has both 'messages' and 'prompt'/'completion'; use one shape per line")
    if has_messages:
        messages, trained = check_messages(record["messages"], "messages")
        if not any(trained):
            raise LineError("no assistant message to train on (add one with role 'assistant')")
        return Parsed(messages=messages, trained=trained)
    if not has_pair:
        raise LineError("needs 'messages' (chat) or 'prompt' and 'completion'")
    for key in ("prompt", "completion"):
        if key not in record:
            raise LineError(f"has no '{key}'")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise LineError("'completion' is empty")
        return Parsed(prompt=prompt, completion=completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        before, _ = check_messages(prompt, "prompt")
        after, trained = check_messages(completion, "completion")
        if not after or any(m["role"] != "assistant" for m in after):
            raise LineError("'completion' must hold assistant messages only")
        if not any(trained):
            raise LineError("no assistant message to train on (every 'completion' message has weight 0)")
        return Parsed(messages=before + after, trained=[False] * len(before) + trained)
    raise LineError("'prompt' and 'completion' must both be strings, or both lists of messages")


# -- normalised example -> token ids and labels ---------------------------------------


def tokenize_example(parsed: Parsed, tokenizer: Any, line: int) -> Example:
    """Token ids, and labels on the trained part only."""
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


def tokenize_preference(preference: Preference, tokenizer: Any, line: int) -> Pair:
    """The prompt rendered with the generation prompt, then each answer as the chat template continues it.

    Both are tokenized as a chat example whose one trained turn is that answer, so the
    prompt's tokens are the same in both and the labels cover the answer (end of turn included).
    """
    context = [False] * len(preference.prompt)

    def side(answer: dict[str, str]) -> Example:
        return tokenize_example(Parsed(messages=[*preference.prompt, answer], trained=[*context, True]), tokenizer, line)

    return Pair(line=line, chosen=side(preference.chosen), rejected=side(preference.rejected))


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
