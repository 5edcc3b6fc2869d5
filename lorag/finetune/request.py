"""`POST /v1/fine_tuning/jobs`'s body, checked, and its hyperparameters resolved ("auto" included).

The shapes are the `openai` SDK's (`job_create_params`); what lorag does not do (reinforcement,
integrations) is refused with a message that says so instead of being ignored.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorag.errors import LoragError
from lorag.finetune.naming import SUFFIX_PATTERN
from lorag.loop.settings import check_metadata

Auto = Literal["auto"]
BASE_LEARNING_RATE = 2e-4  # lorag's LoRA learning rate; OpenAI's learning_rate_multiplier scales it
DEFAULT_BETA = 0.1
MAX_BATCH_AUTO = 8


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int | Auto | None = None
    learning_rate_multiplier: float | Auto | None = None
    n_epochs: int | Auto | None = None
    beta: float | Auto | None = None  # dpo only

    @field_validator("batch_size", "n_epochs")
    @classmethod
    def _positive_int(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("must be between 1 and 256, or 'auto'")
        return value

    @field_validator("learning_rate_multiplier", "beta")
    @classmethod
    def _positive_float(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float | int) and not 0 < value <= 10:
            raise ValueError("must be above 0 and at most 10, or 'auto'")
        return value


class MethodPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: MethodPart | None = None
    dpo: MethodPart | None = None
    reinforcement: dict[str, Any] | None = None


class Promote(BaseModel):
    """lorag's `promote` (the SDK's extra_body): gate the new adapter into a domain (lorag.improve.promotion)."""

    model_config = ConfigDict(extra="forbid")
    domain: str = Field(min_length=1)
    eval_file: str | None = None  # held-out items; default: the job's validation_file
    graders: list[str] | None = None  # some of the domain's graders; default: all of them
    max_items: int = Field(default=200, ge=1, le=10_000)
    max_tokens: int | None = Field(default=None, ge=1)


class CreateJob(BaseModel):
    """The request body, as the SDK sends it."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI; still sent by older scripts
    suffix: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None
    promote: Promote | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value and not SUFFIX_PATTERN.match(value):
            raise ValueError("use up to 64 letters, digits, '-' or '_', starting with a letter or digit")
        return value or None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(value)

    @model_validator(mode="after")
    def _supported(self) -> CreateJob:
        if self.method is not None and self.method.type == "reinforcement":
            raise ValueError("method.type 'reinforcement' is not supported by lorag; use 'supervised' or 'dpo'")
        if self.integrations:
            raise ValueError("integrations (e.g. wandb) are not supported by lorag; its events and result "
                             "files carry the metrics")
        if self.method is not None and self.hyperparameters is not None:
            raise ValueError("set hyperparameters in method.<type>.hyperparameters or the deprecated "
                             "top-level hyperparameters, not both")
        return self

    @property
    def method_type(self) -> Literal["supervised", "dpo"]:
        return "dpo" if self.method is not None and self.method.type == "dpo" else "supervised"

    @property
    def asked(self) -> Hyperparameters:
        """What the caller asked for, wherever it was put."""
        if self.method is not None:
            part = self.method.dpo if self.method_type == "dpo" else self.method.supervised
            return (part.hyperparameters if part else None) or Hyperparameters()
        return self.hyperparameters or Hyperparameters()


def parse_create(body: dict[str, Any]) -> CreateJob:
    """The body checked, or a 400 naming the first bad field (OpenAI's `param`)."""
    try:
        return CreateJob.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unknown parameter '{param}'"
        raise LoragError(f"Invalid fine-tuning job: {param}: {message}" if param else message, param=param,
                         code="invalid_request") from None


def auto_epochs(n_examples: int) -> int:
    """OpenAI's documented rule: 3 epochs, more for small files (~100 example passes), fewer for large ones."""
    target, low, high = 3, 100, 25_000
    if n_examples * target < low:
        return min(25, max(1, low // max(1, n_examples)))
    if n_examples * target > high:
        return max(1, high // n_examples)
    return target


def auto_batch_size(n_examples: int) -> int:
    """About 1% of the examples, between 1 and 8 (LoRA on one device: small batches, more steps)."""
    return max(1, min(MAX_BATCH_AUTO, n_examples // 100))


def resolve(asked: Hyperparameters, method: str, n_examples: int) -> dict[str, Any]:
    """Every hyperparameter a number: what the job will train with (shown on the job from then on)."""

    def pick(value: Any, auto: Any) -> Any:
        return auto if value is None or value == "auto" else value

    resolved: dict[str, Any] = {
        "batch_size": int(pick(asked.batch_size, auto_batch_size(n_examples))),
        "learning_rate_multiplier": float(pick(asked.learning_rate_multiplier, 1.0)),
        "n_epochs": int(pick(asked.n_epochs, auto_epochs(n_examples))),
    }
    if method == "dpo":
        resolved["beta"] = float(pick(asked.beta, DEFAULT_BETA))
    elif asked.beta is not None:
        raise LoragError("beta is a DPO hyperparameter; use method={'type': 'dpo', ...}.",
                         param="method.supervised.hyperparameters.beta")
    return resolved


def method_json(method: str, resolved: dict[str, Any]) -> dict[str, Any]:
    """The job's `method` as the SDK reads it."""
    return {"type": method, method: {"hyperparameters": resolved}}


def new_seed() -> int:
    return random.randrange(2**31 - 1)
