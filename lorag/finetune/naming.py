"""Ids of what fine-tuning makes: jobs, events, checkpoints, and the `ft:` models it serves."""

from __future__ import annotations

import re
import secrets

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def new_id(prefix: str) -> str:
    """`prefix-` and 24 random base-36 characters, as OpenAI's ids look (ftjob-…, ftevent-…)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return f"{prefix}-" + "".join(secrets.choice(alphabet) for _ in range(24))


def base_part(served_name: str) -> str:
    """The base model as it appears in an ft: id: its last path segment, with nothing but [A-Za-z0-9._-]."""
    last = served_name.rstrip("/").rsplit("/", 1)[-1]
    return _UNSAFE.sub("-", last).strip("-") or "model"


def ft_model_id(served_name: str, organization: str, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:<org>:<suffix>:<job-id>` (OpenAI's shape; an empty suffix leaves `::`)."""
    return f"ft:{base_part(served_name)}:{organization}:{suffix or ''}:{job_id}"


def checkpoint_model_id(model_id: str, step: int) -> str:
    return f"{model_id}:ckpt-step-{step}"
