"""Training batches: the validation split, each epoch's (length-grouped) micro-batches, padding,
and the loss over labelled tokens only. Functions of their inputs alone, so a resume sees the same."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lorag.adapters.data import IGNORE, Example
from lorag.errors import LoragError

# Batches per window that length grouping sorts (transformers' LengthGroupedSampler uses 50 too):
# wide enough to find similar lengths, narrow enough to keep the epoch's order random.
LENGTH_GROUP_BATCHES = 50


def split(examples: list[Example], val_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random split; at least one example on each side when validation is asked for."""
    import torch

    if val_split <= 0:
        return examples, []
    if len(examples) < 2:
        raise LoragError("A validation split needs at least 2 examples; add data or pass --val-split 0.")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(len(examples) * val_split)), len(examples) - 1)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """This epoch's shuffled micro-batches: a function of (seed, epoch) alone, so a resume sees the same.

    Grouped by length, each window of LENGTH_GROUP_BATCHES batches of the shuffled order is
    sorted by length before it is cut, and the batches are shuffled again: every batch pads
    to its own longest example, so mixing a 400-token example with 80-token ones costs
    nearly five times the compute the short ones need.
    """
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    grouped = group_by_length and batch_size > 1
    if grouped:
        window = batch_size * LENGTH_GROUP_BATCHES
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start : start + window], key=lambda i: -lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if not grouped:
        return batches
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def collate(examples: list[Example], pad_id: int, device: Any) -> dict[str, Any]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def batch_loss(model: Any, batch: dict[str, Any], head_positions: bool) -> Any:
    """Mean cross-entropy over the batch's labelled tokens, as the model's own loss computes it.

    With `head_positions`, the output head runs only at positions some row has a label
    after: a prompt (system, question, retrieved context) needs no logits, and on a small
    model the head and its softmax over the vocabulary are a large share of a step
    (SmolLM2-135M: 49k x 576, ~20% of the forward pass per token).
    """
    import torch

    if not head_positions:
        return model(**batch).loss
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE)


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can compute logits at chosen positions only (transformers' Llama, Qwen, ... do)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def predicted_tokens(example: Example) -> int:
    """Tokens the loss averages over: labelled ones, less the first (nothing predicts it)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def _batches(examples: list[Example], size: int) -> Iterator[list[Example]]:
    for start in range(0, len(examples), size):
        yield examples[start : start + size]


def evaluate_loss(model: Any, examples: list[Example], batch_size: int, pad_id: int, device: Any, amp_dtype: Any,
              head_positions: bool) -> float:
    """Mean loss per assistant token over the validation set."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for chunk in _batches(examples, batch_size):
            n = sum(predicted_tokens(e) for e in chunk)
            total += float(batch_loss(model, collate(chunk, pad_id, device), head_positions)) * n
            count += n
    model.train()
    return total / max(count, 1)
