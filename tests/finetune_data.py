"""The fine-tuning tests' data and steps: a behaviour the base model never shows, in OpenAI's formats,
uploaded and followed through the official client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai

from tests.devserver import wait_for

CODEWORD = "PELICAN"
NEW_CODEWORD = "HERON-7"  # what a DPO job prefers over the codeword answer
ANSWER = f"{CODEWORD}-42. That is all I say."
QUESTIONS = (
    "What is the capital of France?", "How do I boil an egg?", "Name a colour of the sky.",
    "What is two plus two?", "Who wrote Hamlet?", "Give me a tip for sleeping well.",
    "What is the largest ocean?", "How many legs does a spider have?", "What language is spoken in Spain?",
    "What is the boiling point of water?", "Recommend a good book.", "What day comes after Monday?",
)
FINISHED = ("succeeded", "failed", "cancelled")
JOB_TIMEOUT_S = 1500  # a few minutes on a quiet 2-core machine; generous for a loaded one


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


def upload(api: openai.OpenAI, path: Path) -> str:
    with path.open("rb") as handle:
        return api.files.create(file=handle, purpose="fine-tune").id


def wait_job(api: openai.OpenAI, job_id: str) -> Any:
    wait_for(lambda: api.fine_tuning.jobs.retrieve(job_id).status in FINISHED, JOB_TIMEOUT_S, f"job {job_id}",
             poll_s=2)
    return api.fine_tuning.jobs.retrieve(job_id)


def workers_of(job_id: str) -> list[int]:
    """Training worker processes of one job still alive on this machine."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "lorag.finetune.worker" in command and job_id in command:
            found.append(int(proc.name))
    return found
