"""DPO (direct preference optimization): raise the preferred answer's likelihood over the rejected one's,
relative to a frozen reference model.

TRL's default ("sigmoid") loss, per pair: `-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`,
each term an answer's log-probability summed over its tokens. The reference is the model
training starts from (the base with a fresh LoRA, whose B is zero; or --init-adapter): its
log-probabilities are computed once, before the first step, and saved in the run directory,
so a resumed run reuses them rather than recomputing them with the half-trained adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorag.adapters.batches import Measured, batches_of, collate, head_logits, inference
from lorag.adapters.checkpoints import write_file_atomically
from lorag.adapters.data import IGNORE, Pair
from lorag.errors import LoragError
from lorag.logging import get_logger

log = get_logger("lorag.adapters.train")

REFERENCE_FILE = "reference_logps.pt"


def dpo_loss(chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float) -> tuple[Any, Any]:
    """Per-pair sigmoid DPO loss, and the reward margin (chosen's implicit reward minus rejected's)."""
    import torch

    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -torch.nn.functional.logsigmoid(beta * margin), beta * margin


def sequence_logps(model: Any, batch: dict[str, Any], head_positions: bool) -> Any:
    """Each row's log-probability of its labelled tokens, summed (fp32)."""
    import torch

    logits, targets = head_logits(model, batch, head_positions)
    labelled = targets != IGNORE
    per_token = logits.float().log_softmax(dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labelled, per_token, 0.0).sum(dim=1)


def pair_logps(model: Any, chunk: list[Pair], pad_id: int, device: Any, head_positions: bool) -> tuple[Any, Any]:
    """The chosen and the rejected answers' log-probabilities: one forward over both sides of every pair."""
    rows = [p.chosen for p in chunk] + [p.rejected for p in chunk]
    logps = sequence_logps(model, collate(rows, pad_id, device), head_positions)
    return logps[: len(chunk)], logps[len(chunk) :]


@dataclass(frozen=True)
class Dpo:
    """The batches.Objective of preference pairs: weight and accuracy count pairs."""

    pad_id: int
    device: Any
    head_positions: bool
    beta: float

    def length(self, item: Pair) -> int:
        return max(len(item.chosen.input_ids), len(item.rejected.input_ids))

    def tokens(self, item: Pair) -> int:
        return len(item.chosen.input_ids) + len(item.rejected.input_ids)

    def measure(self, model: Any, chunk: list[Pair]) -> Measured:
        import torch

        if any(p.reference is None for p in chunk):
            raise LoragError("DPO needs the reference log-probabilities of every pair (with_reference).")
        chosen, rejected = pair_logps(model, chunk, self.pad_id, self.device, self.head_positions)
        reference = torch.tensor([p.reference for p in chunk], dtype=chosen.dtype, device=chosen.device)
        losses, margins = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], self.beta)
        return Measured(losses.mean(), len(chunk), int((margins.detach() > 0).sum()))


def with_reference(model: Any, objective: Dpo, splits: dict[str, list[Pair]], run_dir: Path, reuse: bool,
                   batch_size: int, amp_dtype: Any) -> dict[str, list[Pair]]:
    """`splits` with each pair's reference log-probabilities: read from the run (`reuse`, a resume) or
    computed now with `model` as it starts, and saved before the first step."""
    import torch

    path = run_dir / REFERENCE_FILE
    lines = {name: [p.line for p in pairs] for name, pairs in splits.items()}
    saved = torch.load(path, map_location="cpu", weights_only=True) if reuse and path.is_file() else None
    if saved is not None and saved.get("lines") != lines:
        raise LoragError(f"{path} does not match this run's pairs; remove the run directory and train again.")
    if saved is None:
        values = {}
        for name, pairs in splits.items():
            parts = []
            with inference(model, objective.device, amp_dtype):
                for chunk in batches_of(pairs, batch_size):
                    chosen, rejected = pair_logps(model, chunk, objective.pad_id, objective.device,
                                                  objective.head_positions)
                    parts.append(torch.stack([chosen, rejected], dim=1).float().cpu())
            values[name] = torch.cat(parts) if parts else torch.zeros((0, 2))
        saved = {"lines": lines, "logps": values}
        write_file_atomically(path, lambda staging: torch.save(saved, staging))
        log.info("reference_logps_computed", run=str(run_dir), pairs=sum(len(p) for p in splits.values()))
    return {name: [Pair(p.line, p.chosen, p.rejected, (float(c), float(r)))
                   for p, (c, r) in zip(pairs, saved["logps"][name].tolist(), strict=True)]
            for name, pairs in splits.items()}
