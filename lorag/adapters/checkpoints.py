"""A training run's directory: its settings, checkpoints and result, each written atomically.

```
<run>/train_config.json          settings + data digest (what a resume must match)
<run>/checkpoints/step-000040/   adapter (a servable PEFT dir) + optimizer.pt + rng.pt + trainer_state.json
<run>/reference_logps.pt          DPO: the reference model's log-probabilities, computed once
<run>/adapter/                   the final adapter
<run>/result.json                written last: the run is finished
```

A checkpoint is filled in a `.partial` directory and renamed into place only when every
file is on disk, so a `kill -9` mid-save leaves the previous checkpoint as the latest
complete one and never a half-written one to resume from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorag.errors import LoragError

CONFIG_FILE = "train_config.json"
RESULT_FILE = "result.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
CHECKPOINTS = "checkpoints"
ADAPTER_DIR = "adapter"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where the loop is: enough to continue exactly where a checkpoint was taken."""

    step: int = 0
    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # micro-batches of `epoch` already trained
    epoch_loss_sum: float = 0.0  # weighted (tokens; DPO: pairs), for the epoch's mean train loss
    epoch_tokens: int = 0  # the weights' sum (DPO: pairs)
    epoch_correct: int = 0  # of them, predicted right: the epoch's train accuracy
    tokens: int = 0  # input tokens trained on, all processes of the run together
    best_val_loss: float | None = None
    best_step: int | None = None  # its checkpoint is kept: with early stopping it is the result
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def write_dir_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a staging directory, fsync it, then rename it to `target` (which must not exist)."""
    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        fill(staging)
        for item in staging.rglob("*"):
            if item.is_file():
                fsync_path(item)
        os.replace(staging, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_file_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(staging)` fills a staging file, which is fsynced and then renamed to `path`."""
    staging = path.parent / f".{path.name}.partial"
    write(staging)
    fsync_path(staging)
    os.replace(staging, path)
    fsync_path(path.parent)


def write_json_atomically(path: Path, data: Any) -> None:
    write_file_atomically(path, lambda staging: staging.write_text(json.dumps(data, indent=2), encoding="utf-8"))


def fsync_path(path: Path) -> None:
    """A file's or a directory's data and entry on disk (a directory: the names it holds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- checkpoints ----------------------------------------------------------------------


def checkpoint_dirs(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (staging `.partial` dirs are never listed)."""
    root = run / CHECKPOINTS
    found = []
    for child in root.iterdir() if root.is_dir() else []:
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run: Path) -> Path | None:
    dirs = checkpoint_dirs(run)
    return dirs[-1][1] if dirs else None


def save_checkpoint(
    run: Path,
    state: TrainerState,
    save_adapter: Callable[[Path], None],
    optimizer_state: dict[str, Any],
    rng_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write step-N atomically, then drop all but the newest `keep` checkpoints and the best one."""
    import torch

    def fill(staging: Path) -> None:
        save_adapter(staging)
        torch.save(optimizer_state, staging / OPTIMIZER_FILE)
        torch.save(rng_state, staging / RNG_FILE)
        # Written last: a directory holding it is a complete checkpoint.
        (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")

    target = run / CHECKPOINTS / f"step-{state.step:06d}"
    (run / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    if target.exists():  # the same step saved again (an epoch end right after a save)
        return target
    write_dir_atomically(target, fill)
    for step, old in checkpoint_dirs(run)[:-keep]:
        if step != state.best_step:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path) -> tuple[TrainerState, dict[str, Any], dict[str, Any]]:
    """The trainer state, optimizer/scheduler state and RNG state saved in `path`."""
    import torch

    state = TrainerState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
    optimizer_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    rng_state = torch.load(path / RNG_FILE, map_location="cpu", weights_only=True)
    return state, optimizer_state, rng_state


def remove_partials(run: Path) -> None:
    """Staging directories left by a process killed mid-save."""
    for parent in (run, run / CHECKPOINTS):
        for child in parent.glob(".*.partial") if parent.is_dir() else []:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


# -- runs -----------------------------------------------------------------------------


def read_config(run: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'key: saved -> wanted' for every setting that differs."""
    keys = sorted(set(saved) | set(wanted))
    return [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in keys if saved.get(k) != wanted.get(k)]


def is_finished(run: Path) -> bool:
    return (run / RESULT_FILE).is_file()


def find_resumable_run(runs_root: Path, fingerprint: dict[str, Any]) -> Path | None:
    """The newest unfinished run under `runs_root` with a checkpoint and the same settings and data."""
    candidates = [
        run for run in (runs_root.iterdir() if runs_root.is_dir() else [])
        if run.is_dir() and not is_finished(run) and latest_checkpoint(run) is not None
        and read_config(run) == fingerprint
    ]
    return max(candidates, key=lambda run: run.name, default=None)


def prepare_run(run: Path, fingerprint: dict[str, Any], resume: bool) -> Path | None:
    """Make `run` ready to train into; return the checkpoint to resume from, if any.

    Refuses a finished run, and a checkpoint made with other settings or data (resuming it
    would silently train something else than what was asked).
    """
    if is_finished(run):
        raise LoragError(f"{run} holds a finished training run; pick another --output.")
    run.mkdir(parents=True, exist_ok=True)
    remove_partials(run)
    checkpoint = latest_checkpoint(run)
    if checkpoint is not None:
        if not resume:
            raise LoragError(
                f"{run} holds checkpoints of an earlier run; pass --resume to continue it, "
                "or pick another --output."
            )
        saved = read_config(run) or {}
        changed = differences(saved, fingerprint)
        if changed:
            raise LoragError(
                f"Cannot resume {run}: its checkpoints were made with other settings or data ("
                + "; ".join(changed) + "). Pick another --output, or train with the same settings."
            )
    write_json_atomically(run / CONFIG_FILE, fingerprint)
    return checkpoint


# -- the model's part of a checkpoint ---------------------------------------------------


def save_adapter(model: Any, directory: Path, base_ref: str) -> None:
    """A PEFT directory the registry accepts: safetensors, and the base model it was trained on."""
    model.save_pretrained(str(directory), safe_serialization=True)
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_ref
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")


def copy_adapter(source: Path, directory: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        if (source / name).exists():
            shutil.copy2(source / name, directory / name)


def rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(model: Any, optimizer: Any, scheduler: Any, scaler: Any, checkpoint: Path) -> TrainerState:
    """Load a checkpoint into the model, optimizer, scheduler, scaler and RNG; return where the loop was."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state, optimizer_state, rng = load_checkpoint(checkpoint)
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(optimizer_state["optimizer"])
    scheduler.load_state_dict(optimizer_state["scheduler"])
    scaler.load_state_dict(optimizer_state["scaler"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
