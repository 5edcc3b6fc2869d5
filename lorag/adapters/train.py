"""Supervised fine-tuning of a LoRA adapter (QLoRA on a CUDA GPU) with torch + peft.

A plain loop rather than transformers' Trainer: the whole of what happens per step is
on one screen, a checkpoint holds exactly what resuming needs (adapter, optimizer,
scheduler, RNG, position in the epoch), and nothing runs per step that a hand-written
peft loop would not (benchmarks/training.py measures that).

Resuming continues bit-for-bit where the checkpoint was taken: the epoch's order is a
function of (seed, epoch), and the RNG state (LoRA dropout) is restored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lorag.adapters import checkpoints as ckpt
from lorag.adapters.batches import (
    batch_loss,
    collate,
    epoch_batches,
    evaluate_loss,
    predicted_tokens,
    split,
    takes_logits_to_keep,
)
from lorag.adapters.data import file_digest, load_examples
from lorag.adapters.train_model import (
    amp_dtype_for,
    build_model,
    linear_schedule,
    load_tokenizer,
    pad_id_of,
)
from lorag.adapters.train_settings import RESUME_FREE, TrainSettings
from lorag.errors import LoragError
from lorag.logging import get_logger

log = get_logger("lorag.adapters.train")

@dataclass(frozen=True)
class TrainProgress:
    """What the loop reports to a progress bar: 'start', 'step', 'eval' or 'end'."""

    kind: Literal["start", "step", "eval", "end"]
    step: int
    total_steps: int
    epoch: int
    loss: float | None = None
    val_loss: float | None = None


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    run_dir: Path
    steps: int
    total_steps: int
    resumed_from_step: int  # 0: started fresh
    train_loss: float | None  # mean over the last epoch trained
    val_loss: float | None  # of the returned adapter
    initial_val_loss: float | None  # before the first step
    stopped_early: bool
    val_lines: list[int]  # the data file's lines held out for validation
    tokens: int  # input tokens trained on by this process
    seconds: float  # this process's time in the loop (steps, evaluation, checkpoints)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


ProgressCallback = Callable[[TrainProgress], None]


def model_reference(path: str) -> str:
    """What goes into the adapter's base_model_name_or_path: an absolute path when local, else the HF id."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.is_dir() else path


def fingerprint(settings: TrainSettings, data: Path) -> dict[str, Any]:
    """What a checkpoint must have been made with to be resumed."""
    values = settings.model_dump(mode="json", exclude=set(RESUME_FREE))
    values["model_path"] = model_reference(settings.model_path)
    return {**values, "data_sha256": file_digest(data)}


def train(
    settings: TrainSettings,
    data: Path,
    run_dir: Path,
    *,
    resume: bool = True,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `data` into `run_dir`; continue from its last checkpoint if `resume`."""
    import torch

    report = progress or (lambda _event: None)
    tokenizer = load_tokenizer(settings)
    examples = load_examples(data, tokenizer, settings.max_length)
    train_set, val_set = split(examples, settings.val_split, settings.seed)
    if settings.early_stopping_patience and not val_set:
        raise LoragError("Early stopping needs validation data: set --val-split above 0.")
    checkpoint = ckpt.prepare_run(run_dir, fingerprint(settings, data), resume)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = amp_dtype_for(settings.precision, device)
    model, targets = build_model(settings, device, amp_dtype)
    pad_id = pad_id_of(tokenizer)
    head_positions = takes_logits_to_keep(model)
    micro_batches = math.ceil(len(train_set) / settings.batch_size)
    steps_per_epoch = math.ceil(micro_batches / settings.grad_accum)
    total_steps = steps_per_epoch * settings.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(settings.warmup_ratio, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    base_ref = model_reference(settings.model_path)

    def save_adapter(directory: Path) -> None:
        _save_adapter(model, directory, base_ref)

    state = ckpt.TrainerState()
    if checkpoint is not None:
        state = _restore(model, optimizer, scheduler, scaler, checkpoint)
        log.info("train_resumed", run=str(run_dir), checkpoint=str(checkpoint), step=state.step, epoch=state.epoch)
    else:
        torch.manual_seed(settings.seed)  # LoRA dropout; the A matrices were drawn in _build_model
    resumed_from = state.step

    def evaluate() -> float:
        return evaluate_loss(model, val_set, settings.batch_size, pad_id, device, amp_dtype, head_positions)

    def save(state: ckpt.TrainerState) -> None:
        ckpt.save_checkpoint(
            run_dir, state, save_adapter,
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
            _rng_state(), settings.keep_checkpoints,
        )
        log.debug("checkpoint_saved", step=state.step)

    initial_val = None
    if val_set and state.step == 0:
        initial_val = evaluate()
        state.history.append({"step": 0, "epoch": 0, "val_loss": initial_val})
    elif state.history and state.history[0].get("step") == 0:
        initial_val = state.history[0].get("val_loss")
    log.info(
        "train_started", run=str(run_dir), model=base_ref, examples=len(examples), train=len(train_set),
        val=len(val_set), total_steps=total_steps, start_step=state.step, device=device.type,
        precision=str(amp_dtype or torch.float32).removeprefix("torch."), qlora=settings.qlora,
        target_modules=targets, trainable_parameters=sum(p.numel() for p in trainable),
    )
    report(TrainProgress("start", state.step, total_steps, state.epoch, val_loss=initial_val))

    started = time.perf_counter()
    tokens_here = 0
    stopped_early = _patience_spent(state, settings)  # killed after stopping early, before the end
    last_epoch_loss: float | None = None
    model.train()
    while state.epoch < settings.epochs and not stopped_early:
        batches = epoch_batches([len(e.input_ids) for e in train_set], settings.batch_size, settings.seed,
                                state.epoch, settings.group_by_length)
        accumulated = 0
        for index in range(state.batch_in_epoch, len(batches)):
            chunk = [train_set[i] for i in batches[index]]
            batch = collate(chunk, pad_id, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = batch_loss(model, batch, head_positions)
            scaler.scale(loss / settings.grad_accum).backward()
            accumulated += 1
            labelled = sum(predicted_tokens(e) for e in chunk)
            loss_value = float(loss.detach())
            state.epoch_loss_sum += loss_value * labelled
            state.epoch_tokens += labelled
            seen = sum(len(e.input_ids) for e in chunk)
            state.tokens += seen
            tokens_here += seen
            last_in_epoch = index == len(batches) - 1
            if accumulated < settings.grad_accum and not last_in_epoch:
                continue
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            accumulated = 0
            state.step += 1
            state.batch_in_epoch = index + 1
            report(TrainProgress("step", state.step, total_steps, state.epoch, loss=loss_value))
            if last_in_epoch:
                break  # the epoch end evaluates and checkpoints
            evaluated = bool(val_set and settings.eval_steps and state.step % settings.eval_steps == 0)
            if evaluated:
                step_val = evaluate()
                log.info("train_eval", step=state.step, epoch=state.epoch + 1, val_loss=round(step_val, 5))
                state.history.append({"step": state.step, "epoch": state.epoch + 1, "val_loss": step_val})
                stopped_early = _record_eval(state, step_val, settings, report, total_steps)
            if evaluated or (settings.save_steps and state.step % settings.save_steps == 0) or stopped_early:
                save(state)
            if stopped_early:
                break
        if stopped_early:
            break
        last_epoch_loss = state.epoch_loss_sum / max(state.epoch_tokens, 1)
        val_loss = evaluate() if val_set else None
        log.info("train_epoch", epoch=state.epoch + 1, epochs=settings.epochs, step=state.step,
                 train_loss=round(last_epoch_loss, 5), val_loss=None if val_loss is None else round(val_loss, 5))
        state.history.append({"step": state.step, "epoch": state.epoch + 1, "train_loss": last_epoch_loss,
                              "val_loss": val_loss})
        state.epoch += 1
        state.batch_in_epoch = 0
        state.epoch_loss_sum, state.epoch_tokens = 0.0, 0
        if val_loss is not None:
            stopped_early = _record_eval(state, val_loss, settings, report, total_steps)
        save(state)
    seconds = time.perf_counter() - started

    adapter_dir = run_dir / ckpt.ADAPTER_DIR
    use_best = bool(settings.early_stopping_patience and state.best_step is not None)
    source = run_dir / ckpt.CHECKPOINTS / f"step-{state.best_step:06d}" if use_best else None
    if adapter_dir.exists():  # killed after the final save, before result.json: redo it
        import shutil

        shutil.rmtree(adapter_dir)
    ckpt.write_dir_atomically(adapter_dir, lambda d: _copy_adapter(source, d) if source else save_adapter(d))
    _self_check(adapter_dir, settings, base_ref)
    final_val = state.best_val_loss if use_best else _last_val(state)
    if stopped_early:
        log.info("early_stopped", step=state.step, best_step=state.best_step, best_val_loss=state.best_val_loss)
    result = TrainResult(
        adapter_dir=adapter_dir, run_dir=run_dir, steps=state.step, total_steps=total_steps,
        resumed_from_step=resumed_from, train_loss=last_epoch_loss or _last_train(state), val_loss=final_val,
        initial_val_loss=initial_val, stopped_early=stopped_early, val_lines=sorted(e.line for e in val_set),
        tokens=tokens_here, seconds=seconds,
    )
    ckpt.write_json_atomically(run_dir / ckpt.RESULT_FILE, {
        "adapter": str(adapter_dir), "steps": state.step, "total_steps": total_steps,
        "train_loss": result.train_loss, "val_loss": final_val, "initial_val_loss": initial_val,
        "stopped_early": stopped_early, "best_step": state.best_step, "val_lines": result.val_lines,
        "history": state.history,
    })
    log.info("train_finished", run=str(run_dir), adapter=str(adapter_dir), steps=state.step,
             resumed_from_step=resumed_from, train_loss=result.train_loss, val_loss=final_val,
             tokens=tokens_here, tokens_per_s=round(result.tokens_per_second, 1))
    report(TrainProgress("end", state.step, total_steps, state.epoch, loss=result.train_loss, val_loss=final_val))
    return result


def _record_eval(state: ckpt.TrainerState, val_loss: float, settings: TrainSettings,
                 report: ProgressCallback, total_steps: int) -> bool:
    """Track the best validation loss; True when early stopping says stop."""
    report(TrainProgress("eval", state.step, total_steps, state.epoch, val_loss=val_loss))
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_without_improvement = val_loss, state.step, 0
    else:
        state.evals_without_improvement += 1
    return _patience_spent(state, settings)


def _patience_spent(state: ckpt.TrainerState, settings: TrainSettings) -> bool:
    patience = settings.early_stopping_patience
    return bool(patience) and state.evals_without_improvement >= patience


def _last_val(state: ckpt.TrainerState) -> float | None:
    values = [h["val_loss"] for h in state.history if h.get("val_loss") is not None]
    return values[-1] if values else None


def _last_train(state: ckpt.TrainerState) -> float | None:
    values = [h["train_loss"] for h in state.history if h.get("train_loss") is not None]
    return values[-1] if values else None


# -- saving and restoring -------------------------------------------------------------


def _save_adapter(model: Any, directory: Path, base_ref: str) -> None:
    """A PEFT directory the registry accepts: safetensors, and the base model it was trained on."""
    import json

    model.save_pretrained(str(directory), safe_serialization=True)
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_ref
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _copy_adapter(source: Path, directory: Path) -> None:
    import shutil

    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        if (source / name).exists():
            shutil.copy2(source / name, directory / name)


def _self_check(adapter_dir: Path, settings: TrainSettings, base_ref: str) -> None:
    """The registry's own validation, so a finished run always yields a servable adapter."""
    from lorag.adapters.validate import model_module_names, validate_adapter

    validate_adapter(adapter_dir, served_model=base_ref, model_module_names=model_module_names(base_ref),
                     max_lora_rank=settings.rank)


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(model: Any, optimizer: Any, scheduler: Any, scaler: Any, checkpoint: Path) -> ckpt.TrainerState:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state, optimizer_state, rng = ckpt.load_checkpoint(checkpoint)
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(optimizer_state["optimizer"])
    scheduler.load_state_dict(optimizer_state["scheduler"])
    scaler.load_state_dict(optimizer_state["scaler"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
