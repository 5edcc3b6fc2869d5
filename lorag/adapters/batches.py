"""Training batches: the validation split, each epoch's (length-grouped) micro-batches, padding,
and what a micro-batch measures (loss, accuracy). Functions of their inputs alone, so a resume sees the same.

The loop is the same for every training method: an `Objective` says how long an item is
(for batching), how many tokens it feeds the model and what a micro-batch of items
measures; supervised examples are one kind of item, DPO's preference pairs another.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

from lorag.adapters.data import IGNORE, Example
from lorag.errors import LoragError

T = TypeVar("T")
ItemT = TypeVar("ItemT")

# Batches per window that length grouping sorts (transformers' LengthGroupedSampler uses 50 too):
# wide enough to find similar lengths, narrow enough to keep the epoch's order random.
LENGTH_GROUP_BATCHES = 50


def split(examples: list[T], val_split: float, seed: int) -> tuple[list[T], list[T]]:
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


def autocast(device: Any, amp_dtype: Any) -> Any:
    """Mixed precision where the run uses it (amp_dtype None: plain fp32)."""
    import torch

    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def head_logits(model: Any, batch: dict[str, Any], head_positions: bool) -> tuple[Any, Any]:
    """Logits and the labels they predict (IGNORE where none), at the positions the loss needs.

    With `head_positions`, the output head runs only at positions some row has a label
    after: a prompt (system, question, retrieved context) needs no logits, and on a small
    model the head and its softmax over the vocabulary are a large share of a step
    (SmolLM2-135M: 49k x 576, ~20% of the forward pass per token).
    """
    targets = batch["labels"][:, 1:]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not head_positions:
        return model(**inputs).logits[:, :-1], targets
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    return model(**inputs, logits_to_keep=keep).logits, targets[:, keep]


def token_loss(model: Any, batch: dict[str, Any], head_positions: bool) -> tuple[Any, int]:
    """Mean cross-entropy over the batch's labelled tokens (as the model's own loss computes it),
    and how many of those tokens the model's argmax predicts."""
    import torch

    logits, targets = head_logits(model, batch, head_positions)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    correct = int(((logits.detach().argmax(dim=-1) == targets) & (targets != IGNORE)).sum())
    return loss, correct


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can compute logits at chosen positions only (transformers' Llama, Qwen, ... do)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def predicted_tokens(example: Example) -> int:
    """Tokens the loss averages over: labelled ones, less the first (nothing predicts it)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def batches_of(items: list[T], size: int) -> Iterator[list[T]]:
    """`items` in order, `size` at a time (evaluation: no shuffling, nothing to resume)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Measured(NamedTuple):
    """What one micro-batch measured."""

    loss: Any  # scalar tensor: the mean over `weight` (what backward runs on)
    weight: int  # what the mean is over: predicted tokens (supervised) or pairs (dpo)
    correct: int  # of those: tokens the argmax predicts (supervised), pairs ranked right (dpo)


class Objective(Protocol[ItemT]):
    """What a training method computes on its items; the loop around it is the same for all."""

    def length(self, item: ItemT) -> int:
        """Padded width of the item in a micro-batch (batches group by it)."""
        ...

    def tokens(self, item: ItemT) -> int:
        """Input tokens the model reads for the item."""
        ...

    def measure(self, model: Any, chunk: list[ItemT]) -> Measured: ...


@dataclass(frozen=True)
class Supervised:
    """Cross-entropy on the labelled tokens of examples; accuracy is the argmax's share of them."""

    pad_id: int
    device: Any
    head_positions: bool

    def length(self, item: Example) -> int:
        return len(item.input_ids)

    def tokens(self, item: Example) -> int:
        return len(item.input_ids)

    def measure(self, model: Any, chunk: list[Example]) -> Measured:
        loss, correct = token_loss(model, collate(chunk, self.pad_id, self.device), self.head_positions)
        return Measured(loss, sum(predicted_tokens(e) for e in chunk), correct)


@contextmanager
def inference(model: Any, device: Any, amp_dtype: Any) -> Iterator[None]:
    """Eval mode (no dropout), no gradients, the run's precision; training mode again afterwards."""
    import torch

    model.eval()
    try:
        with torch.no_grad(), autocast(device, amp_dtype):
            yield
    finally:
        model.train()


def evaluate(objective: Objective[T], model: Any, items: list[T], batch_size: int, device: Any,
             amp_dtype: Any) -> tuple[float, float]:
    """Mean loss and accuracy over `items` (validation), weighted as training weights them."""
    total, correct, count = 0.0, 0, 0
    with inference(model, device, amp_dtype):
        for chunk in batches_of(items, batch_size):
            measured = objective.measure(model, chunk)
            total += float(measured.loss) * measured.weight
            correct += measured.correct
            count += measured.weight
    return total / max(count, 1), correct / max(count, 1)
