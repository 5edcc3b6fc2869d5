"""What decides what `lorag adapters train` trains: its settings, validated in one place."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorag.errors import LoragError

ALL_LINEAR = "all-linear"
# Settings that change how a run is saved, not what it computes: a resume may change them.
RESUME_FREE = ("save_steps", "keep_checkpoints", "gradient_checkpointing")


class TrainSettings(BaseModel):
    """Everything that decides what is trained (flags of `lorag adapters train`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str = Field(min_length=1)
    tokenizer_path: str | None = None
    trust_remote_code: bool = False
    method: Literal["supervised", "dpo"] = Field(
        default="supervised",
        description="supervised: learn the assistant turns; dpo: prefer each pair's preferred answer.")
    beta: float = Field(default=0.1, gt=0, description="DPO's beta: how far from the reference it may move "
                        "(larger: closer); ignored by supervised training.")
    init_adapter: str | None = Field(
        default=None, min_length=1,
        description="A PEFT LoRA directory to start from (continue training it). Its own LoRA config "
                    "(rank, alpha, target modules, dropout) is used then; rank, alpha, target_modules "
                    "and dropout here are ignored. DPO's reference model is then base + this adapter.")
    rank: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.03, ge=0, le=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=8, ge=1)
    group_by_length: bool = Field(default=True, description="Batch examples of similar length (less padding).")
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=1024, ge=2)
    val_split: float = Field(default=0.1, ge=0, lt=1)
    eval_steps: int = Field(default=0, ge=0, description="Also evaluate every N steps (0: at epoch ends only).")
    early_stopping_patience: int = Field(default=0, ge=0, description="Evaluations without improvement (0: off).")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    qlora: bool = False
    save_steps: int = Field(default=0, ge=0, description="Checkpoint every N steps (besides each epoch end).")
    keep_checkpoints: int = Field(default=2, ge=1)

    @classmethod
    def build(cls, **values: Any) -> TrainSettings:
        """Validated settings, or a LoragError naming each bad value."""
        try:
            return cls(**values)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in err.errors())
            raise LoragError(f"Invalid training settings: {problems}") from None
