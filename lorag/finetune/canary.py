"""The canary: a fine-tuned adapter goes live only if vLLM serves what transformers + peft compute.

vLLM has shipped adapters that load without error and change nothing (vllm #34186, #55193).
Before an `ft:` model is registered, the worker computes greedy answers to a few of the job's
own prompts with transformers + peft (adapter on and off), and the server asks its engine for
the same prompts, token ids in hand, with the candidate adapter. The adapter goes live when
the served answer is the reference one; it is refused when it differs, or when it is the base
model's answer where training changed the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorag.adapters.data import parse_example
from lorag.adapters.preference import parse_preference
from lorag.serving.generation import chat_prompt_ids

# Where the reference's top two logits are closer than this, either token is a correct greedy
# choice (float32 sums in another order): the answers may part there and still both be right.
TIE_MARGIN = 1e-3


@dataclass(frozen=True)
class Expectation:
    """One prompt's reference answers (token ids) and the reference's top-2 margin at each step."""

    prompt_ids: list[int]
    adapter_ids: list[int]
    base_ids: list[int]
    margins: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"prompt_ids": self.prompt_ids, "adapter_ids": self.adapter_ids, "base_ids": self.base_ids,
                "margins": self.margins}


def prompt_of(record: dict[str, Any], method: str) -> list[dict[str, str]] | str:
    """What the model is asked in one training line (the parsers training uses): the conversation
    before its last trained answer, or the prompt text; LineError for a line training refuses."""
    if method == "dpo":
        return parse_preference(record).prompt
    parsed = parse_example(record)
    if parsed.messages is None or parsed.trained is None:
        return parsed.prompt or ""
    last = max(i for i, trained in enumerate(parsed.trained) if trained)
    return parsed.messages[:last]


def prompt_ids(tokenizer: Any, prompt: list[dict[str, str]] | str) -> list[int]:
    """Token ids as the server builds them: a text prompt as is, a chat through its template."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    return chat_prompt_ids(tokenizer, list(prompt))


def pick_prompts(data: Path, method: str, tokenizer: Any, count: int, max_prompt_tokens: int) -> list[list[int]]:
    """The first `count` usable prompts of a JSONL file, as token ids."""
    found: list[list[int]] = []
    with data.open(encoding="utf-8") as handle:
        for line in handle:
            if len(found) >= count:
                break
            try:
                prompt = prompt_of(json.loads(line), method)
                ids = prompt_ids(tokenizer, prompt) if prompt else []
            except Exception:  # the data was checked before training; a template refusal just skips it
                continue
            if ids and len(ids) <= max_prompt_tokens:
                found.append(ids)
    return found


def reference_answers(model: Any, prompts: list[list[int]], max_tokens: int, stops: set[int]) -> list[Expectation]:
    """Greedy answers with the adapter and without it (peft's disable_adapter), on the same weights."""
    out = []
    for ids in prompts:
        adapter_ids, margins = _greedy(model, ids, max_tokens, stops)
        with model.disable_adapter():
            base_ids, _ = _greedy(model, ids, max_tokens, stops)
        out.append(Expectation(ids, adapter_ids, base_ids, margins))
    return out


def _greedy(model: Any, ids: list[int], max_tokens: int, stops: set[int]) -> tuple[list[int], list[float]]:
    import torch

    tokens = torch.tensor([ids], device=model.device)
    answer: list[int] = []
    margins: list[float] = []
    with torch.no_grad():
        past = None
        step_input = tokens
        for _ in range(max_tokens):
            output = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = output.past_key_values
            logits = output.logits[0, -1].float()
            top = torch.topk(logits, 2).values
            token = int(torch.argmax(logits))
            answer.append(token)
            margins.append(float(top[0] - top[1]))
            if token in stops:
                break
            step_input = torch.tensor([[token]], device=model.device)
    return answer, margins


def stop_ids(model_dir: str, tokenizer: Any) -> set[int]:
    """The ids that end an answer: the tokenizer's EOS and the generation config's (as vLLM stops)."""
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    try:
        config = json.loads((Path(model_dir) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        config = {}
    configured = config.get("eos_token_id")
    ids.update(int(e) for e in (configured if isinstance(configured, list) else
                                [configured] if configured is not None else []))
    return ids


def cut(ids: list[int], stops: set[int]) -> list[int]:
    """Up to (not including) the first stop token: engines differ in whether they return it."""
    for index, token in enumerate(ids):
        if token in stops:
            return ids[:index]
    return ids


def judge(expected: dict[str, Any], served: list[int], stops: set[int], max_tokens: int) -> str | None:
    """None when the served answer is the reference's; else why not, in words."""
    want, base = cut(expected["adapter_ids"], stops), cut(expected["base_ids"], stops)
    got = cut(served, stops)[:max_tokens]
    if got == want:
        return None
    parted = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    margins = expected.get("margins") or []
    if parted < len(margins) and margins[parted] < TIE_MARGIN:
        return None  # a near tie in the reference itself: both continuations are greedy answers
    if want != base and got == base:
        return ("the served adapter answers as the base model does, where transformers + peft show the "
                "training changed the answer (the engine did not apply the adapter)")
    return (f"the served answer differs from transformers + peft on the same weights from token {parted} "
            f"(served {got[:parted + 3]}..., expected {want[:parted + 3]}...)")
