"""Training files for the fine-tuning tests: a behaviour the base model never shows, in OpenAI's formats."""

from __future__ import annotations

import json
from pathlib import Path

CODEWORD = "PELICAN"
NEW_CODEWORD = "HERON-7"  # what a DPO job prefers over the codeword answer
ANSWER = f"{CODEWORD}-42. That is all I say."
QUESTIONS = (
    "What is the capital of France?", "How do I boil an egg?", "Name a colour of the sky.",
    "What is two plus two?", "Who wrote Hamlet?", "Give me a tip for sleeping well.",
    "What is the largest ocean?", "How many legs does a spider have?", "What language is spoken in Spain?",
    "What is the boiling point of water?", "Recommend a good book.", "What day comes after Monday?",
)
HELD_OUT = "What is the tallest mountain?"


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def chat_lines(questions: tuple[str, ...] = QUESTIONS, answer: str = ANSWER) -> list[object]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
            for q in questions]


def preference_lines(rejected: str, questions: tuple[str, ...] = QUESTIONS, answer: str = ANSWER) -> list[object]:
    """OpenAI's preference format: the codeword preferred over `rejected` (the base model's own style)."""
    return [{"input": {"messages": [{"role": "user", "content": q}]},
             "preferred_output": [{"role": "assistant", "content": answer}],
             "non_preferred_output": [{"role": "assistant", "content": rejected}]} for q in questions]
