"""`[fine_tuning]`: how many jobs train at once, and how much of the machine one may take."""

from __future__ import annotations

import os

from pydantic import Field

from lorag.schema import Strict


def default_threads() -> int:
    """Half the cores (at least one): the engine and the API keep the other half."""
    return max(1, len(os.sched_getaffinity(0)) // 2)  # the cores this process may use, not the machine's


class FineTuningSettings(Strict):
    """Jobs run in worker processes beside the server, never inside it (docs/fine-tuning.md)."""

    max_concurrent: int = Field(default=1, ge=0, description="Jobs training at once (0: queue only, run none).")
    threads: int = Field(default_factory=default_threads, ge=1, description="CPU threads one job may use.")
    gpu_memory_fraction: float = Field(default=0.3, gt=0, le=1,
                                       description="Share of a CUDA GPU's memory one job may allocate.")
    organization: str = Field(default="lorag", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$",
                              description="The <org> part of ft:<base>:<org>:<suffix>:<job-id>.")
    max_file_bytes: int = Field(default=512 << 20, gt=0, description="Largest file one upload may hold.")
    max_attempts: int = Field(default=3, ge=1, description="Worker starts per job before it fails (crashes, restarts).")
    save_steps: int = Field(default=10, ge=0, description="Checkpoint every N steps besides epoch ends (resume point).")
    keep_checkpoints: int = Field(default=3, ge=1, description="Checkpoints kept and served as ...:ckpt-step-N.")
    canary_prompts: int = Field(default=3, ge=0, description="Validation prompts the canary compares (0: off).")
    canary_max_tokens: int = Field(default=16, ge=1)
    max_length: int = Field(default=2048, ge=16, description="Longest training example in tokens.")
    rank: int = Field(default=16, ge=1, description="LoRA rank of a new adapter (at most engine.max_lora_rank).")
    gradient_checkpointing: bool = Field(default=False, description="Less memory, more compute (GPU beside vLLM).")
    qlora: bool = Field(default=False, description="4-bit base model while training (CUDA + bitsandbytes).")
