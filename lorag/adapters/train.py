"""Fine-tuning a LoRA adapter (QLoRA on a CUDA GPU) with torch + peft: supervised, or DPO on preference pairs.

A plain loop rather than transformers' Trainer (or TRL's): the whole of what happens per
step is on one screen, a checkpoint holds exactly what resuming needs (adapter, optimizer,
scheduler, RNG, position in the epoch), and nothing runs per step that a hand-written
peft loop would not (benchmarks/training.py measures that). The two methods share the
loop; what differs (the items, the loss, the accuracy) is a batches.Objective.

Resuming continues bit-for-bit where the checkpoint was taken: the epoch's order is a
function of (seed, epoch), and the RNG state (LoRA dropout) is restored. `should_stop`
(a job paused or cancelled) checkpoints the step it stops at, so nothing is lost.
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
    Objective,
    Supervised,
    autocast,
    epoch_batches,
    evaluate,
    split,
    takes_logits_to_keep,
)
from lorag.adapters.data import file_digest, load_examples, load_pairs
from lorag.adapters.dpo import Dpo, with_reference
from lorag.adapters.train_model import (
    adapter_rank,
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
    """What the loop reports to a progress bar or a job: 'start', 'step', 'eval', 'checkpoint' or 'end'.

    accuracy ('step'; 'end': the last epoch's): supervised, the share of labelled tokens the
    model's argmax predicts; dpo, the share of pairs whose preferred answer earns the larger
    implicit reward. val_accuracy is the same on the validation data.
    """

    kind: Literal["start", "step", "eval", "checkpoint", "end"]
    step: int
    total_steps: int
    epoch: int
    loss: float | None = None
    val_loss: float | None = None
    accuracy: float | None = None
    val_accuracy: float | None = None
    tokens: int = 0  # input tokens trained on so far, all processes of the run together
    path: Path | None = None  # 'checkpoint': its directory


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
    val_lines: list[int]  # the data file's lines held out for validation (none with val_data)
    tokens: int  # input tokens trained on by this process
    seconds: float  # this process's time in the loop (steps, evaluation, checkpoints)
    total_tokens: int  # input tokens trained on by all processes of the run
    val_accuracy: float | None  # of the returned adapter

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class TrainingStopped(Exception):
    """`should_stop` said stop: the run is checkpointed at `step`; train() on it again resumes there."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training stopped at step {step}; its checkpoint resumes it")
        self.step = step


ProgressCallback = Callable[[TrainProgress], None]


def model_reference(path: str) -> str:
    """What goes into the adapter's base_model_name_or_path: an absolute path when local, else the HF id."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.is_dir() else path


def fingerprint(settings: TrainSettings, data: Path, val_data: Path | None = None) -> dict[str, Any]:
    """What a checkpoint must have been made with to be resumed."""
    values = settings.model_dump(mode="json", exclude=set(RESUME_FREE))
    values["model_path"] = model_reference(settings.model_path)
    values["data_sha256"] = file_digest(data)
    if val_data is not None:
        values["val_data_sha256"] = file_digest(val_data)
    return values


def load_items(settings: TrainSettings, path: Path, tokenizer: Any) -> list[Any]:
    """The method's items of `path`: examples (supervised) or preference pairs (dpo)."""
    load = load_examples if settings.method == "supervised" else load_pairs
    return list(load(path, tokenizer, settings.max_length))


def train(
    settings: TrainSettings,
    data: Path,
    run_dir: Path,
    *,
    resume: bool = True,
    progress: ProgressCallback | None = None,
    val_data: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `data` into `run_dir`; continue from its last checkpoint if `resume`.

    `val_data`: validate on that file (all of `data` trains; val_split is not applied).
    `should_stop`: asked after every optimizer step; True checkpoints the step and raises TrainingStopped.
    """
    import torch

    report = progress or (lambda _event: None)
    tokenizer = load_tokenizer(settings)
    items = load_items(settings, data, tokenizer)
    if val_data is not None:
        train_set, val_set = items, load_items(settings, val_data, tokenizer)
    else:
        train_set, val_set = split(items, settings.val_split, settings.seed)
    if settings.early_stopping_patience and not val_set:
        raise LoragError("Early stopping needs validation data: set --val-split above 0, or pass --val-data.")
    checkpoint = ckpt.prepare_run(run_dir, fingerprint(settings, data, val_data), resume)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = amp_dtype_for(settings.precision, device)
    model, targets = build_model(settings, device, amp_dtype)
    pad_id = pad_id_of(tokenizer)
    head_positions = takes_logits_to_keep(model)
    objective: Objective[Any] = Supervised(pad_id, device, head_positions)
    if settings.method == "dpo":
        objective = dpo = Dpo(pad_id, device, head_positions, settings.beta)
        # The reference is the model as it starts: before a checkpoint's weights are restored.
        splits = with_reference(model, dpo, {"train": train_set, "val": val_set}, run_dir,
                                reuse=checkpoint is not None, batch_size=settings.batch_size, amp_dtype=amp_dtype)
        train_set, val_set = splits["train"], splits["val"]
    micro_batches = math.ceil(len(train_set) / settings.batch_size)
    steps_per_epoch = math.ceil(micro_batches / settings.grad_accum)
    total_steps = steps_per_epoch * settings.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(settings.warmup_ratio, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    base_ref = model_reference(settings.model_path)

    def save_adapter(directory: Path) -> None:
        ckpt.save_adapter(model, directory, base_ref)

    state = ckpt.TrainerState()
    if checkpoint is not None:
        state = ckpt.restore(model, optimizer, scheduler, scaler, checkpoint)
        log.info("train_resumed", run=str(run_dir), checkpoint=str(checkpoint), step=state.step, epoch=state.epoch)
    else:
        torch.manual_seed(settings.seed)  # LoRA dropout; the A matrices were drawn in build_model
    resumed_from = state.step
    saved_step = state.step if checkpoint is not None else None

    def validate() -> tuple[float, float]:
        return evaluate(objective, model, val_set, settings.batch_size, device, amp_dtype)

    def save() -> None:
        nonlocal saved_step
        if saved_step == state.step:  # an epoch end or a stop right after a save
            return
        path = ckpt.save_checkpoint(
            run_dir, state, save_adapter,
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
            ckpt.rng_state(), settings.keep_checkpoints,
        )
        saved_step = state.step
        log.debug("checkpoint_saved", step=state.step)
        report(TrainProgress("checkpoint", state.step, total_steps, state.epoch, tokens=state.tokens, path=path))

    def stop_if_asked() -> None:
        if should_stop is not None and should_stop():
            save()
            log.info("train_stopped", run=str(run_dir), step=state.step, epoch=state.epoch)
            raise TrainingStopped(state.step)

    initial_val = initial_accuracy = None
    if val_set and state.step == 0:
        initial_val, initial_accuracy = validate()
        state.history.append({"step": 0, "epoch": 0, "val_loss": initial_val, "val_accuracy": initial_accuracy})
    elif state.history and state.history[0].get("step") == 0:
        initial_val, initial_accuracy = state.history[0].get("val_loss"), state.history[0].get("val_accuracy")
    log.info(
        "train_started", run=str(run_dir), model=base_ref, method=settings.method, examples=len(items),
        train=len(train_set), val=len(val_set), total_steps=total_steps, start_step=state.step, device=device.type,
        precision=str(amp_dtype or torch.float32).removeprefix("torch."), qlora=settings.qlora,
        target_modules=targets, trainable_parameters=sum(p.numel() for p in trainable),
    )
    report(TrainProgress("start", state.step, total_steps, state.epoch, val_loss=initial_val,
                         val_accuracy=initial_accuracy, tokens=state.tokens))

    started = time.perf_counter()
    tokens_here = 0
    stopped_early = _patience_spent(state, settings)  # killed after stopping early, before the end
    last_epoch_loss = last_epoch_accuracy = None
    model.train()
    while state.epoch < settings.epochs and not stopped_early:
        batches = epoch_batches([objective.length(i) for i in train_set], settings.batch_size, settings.seed,
                                state.epoch, settings.group_by_length)
        accumulated, step_loss, step_weight, step_correct = 0, 0.0, 0, 0
        for index in range(state.batch_in_epoch, len(batches)):
            chunk = [train_set[i] for i in batches[index]]
            with autocast(device, amp_dtype):
                measured = objective.measure(model, chunk)
            scaler.scale(measured.loss / settings.grad_accum).backward()
            accumulated += 1
            step_loss += float(measured.loss.detach()) * measured.weight
            step_weight += measured.weight
            step_correct += measured.correct
            seen = sum(objective.tokens(i) for i in chunk)
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
            state.step += 1
            state.batch_in_epoch = index + 1
            state.epoch_loss_sum += step_loss
            state.epoch_tokens += step_weight
            state.epoch_correct += step_correct
            report(TrainProgress("step", state.step, total_steps, state.epoch, loss=step_loss / max(step_weight, 1),
                                 accuracy=step_correct / max(step_weight, 1), tokens=state.tokens))
            accumulated, step_loss, step_weight, step_correct = 0, 0.0, 0, 0
            if last_in_epoch:
                break  # the epoch end evaluates and checkpoints
            evaluated = bool(val_set and settings.eval_steps and state.step % settings.eval_steps == 0)
            if evaluated:
                step_val, step_accuracy = validate()
                log.info("train_eval", step=state.step, epoch=state.epoch + 1, val_loss=round(step_val, 5),
                         val_accuracy=round(step_accuracy, 4))
                state.history.append({"step": state.step, "epoch": state.epoch + 1, "val_loss": step_val,
                                      "val_accuracy": step_accuracy})
                stopped_early = _record_eval(state, step_val, step_accuracy, settings, report, total_steps)
            if evaluated or (settings.save_steps and state.step % settings.save_steps == 0) or stopped_early:
                save()
            if stopped_early:
                break
            stop_if_asked()
        if stopped_early:
            break
        last_epoch_loss = state.epoch_loss_sum / max(state.epoch_tokens, 1)
        last_epoch_accuracy = state.epoch_correct / max(state.epoch_tokens, 1)
        val_loss, val_accuracy = validate() if val_set else (None, None)
        log.info("train_epoch", epoch=state.epoch + 1, epochs=settings.epochs, step=state.step,
                 train_loss=round(last_epoch_loss, 5), train_accuracy=round(last_epoch_accuracy, 4),
                 val_loss=None if val_loss is None else round(val_loss, 5),
                 val_accuracy=None if val_accuracy is None else round(val_accuracy, 4))
        state.history.append({"step": state.step, "epoch": state.epoch + 1, "train_loss": last_epoch_loss,
                              "train_accuracy": last_epoch_accuracy, "val_loss": val_loss,
                              "val_accuracy": val_accuracy})
        state.epoch += 1
        state.batch_in_epoch = 0
        state.epoch_loss_sum, state.epoch_tokens, state.epoch_correct = 0.0, 0, 0
        if val_loss is not None and val_accuracy is not None:
            stopped_early = _record_eval(state, val_loss, val_accuracy, settings, report, total_steps)
        save()
        if state.epoch < settings.epochs and not stopped_early:
            stop_if_asked()
    seconds = time.perf_counter() - started

    adapter_dir = run_dir / ckpt.ADAPTER_DIR
    use_best = bool(settings.early_stopping_patience and state.best_step is not None)
    source = run_dir / ckpt.CHECKPOINTS / f"step-{state.best_step:06d}" if use_best else None
    if adapter_dir.exists():  # killed after the final save, before result.json: redo it
        import shutil

        shutil.rmtree(adapter_dir)
    ckpt.write_dir_atomically(adapter_dir, lambda d: ckpt.copy_adapter(source, d) if source else save_adapter(d))
    _self_check(adapter_dir, adapter_rank(model), base_ref)
    final_val = state.best_val_loss if use_best else _last(state, "val_loss")
    final_accuracy = _at_best(state) if use_best else _last(state, "val_accuracy")
    if stopped_early:
        log.info("early_stopped", step=state.step, best_step=state.best_step, best_val_loss=state.best_val_loss)
    result = TrainResult(
        adapter_dir=adapter_dir, run_dir=run_dir, steps=state.step, total_steps=total_steps,
        resumed_from_step=resumed_from, train_loss=last_epoch_loss or _last(state, "train_loss"), val_loss=final_val,
        initial_val_loss=initial_val, stopped_early=stopped_early,
        val_lines=[] if val_data is not None else sorted(e.line for e in val_set), tokens=tokens_here,
        seconds=seconds, total_tokens=state.tokens, val_accuracy=final_accuracy,
    )
    ckpt.write_json_atomically(run_dir / ckpt.RESULT_FILE, {
        "adapter": str(adapter_dir), "method": settings.method, "steps": state.step, "total_steps": total_steps,
        "train_loss": result.train_loss, "val_loss": final_val, "val_accuracy": final_accuracy,
        "initial_val_loss": initial_val, "stopped_early": stopped_early, "best_step": state.best_step,
        "val_lines": result.val_lines, "total_tokens": state.tokens, "history": state.history,
    })
    log.info("train_finished", run=str(run_dir), adapter=str(adapter_dir), steps=state.step,
             resumed_from_step=resumed_from, train_loss=result.train_loss, val_loss=final_val,
             val_accuracy=final_accuracy, tokens=tokens_here, tokens_per_s=round(result.tokens_per_second, 1))
    report(TrainProgress("end", state.step, total_steps, state.epoch, loss=result.train_loss, val_loss=final_val,
                         accuracy=_last(state, "train_accuracy"), val_accuracy=final_accuracy,
                         tokens=state.tokens))
    return result


def _record_eval(state: ckpt.TrainerState, val_loss: float, val_accuracy: float, settings: TrainSettings,
                 report: ProgressCallback, total_steps: int) -> bool:
    """Track the best validation loss; True when early stopping says stop."""
    report(TrainProgress("eval", state.step, total_steps, state.epoch, val_loss=val_loss, val_accuracy=val_accuracy,
                         tokens=state.tokens))
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_without_improvement = val_loss, state.step, 0
    else:
        state.evals_without_improvement += 1
    return _patience_spent(state, settings)


def _patience_spent(state: ckpt.TrainerState, settings: TrainSettings) -> bool:
    patience = settings.early_stopping_patience
    return bool(patience) and state.evals_without_improvement >= patience


def _last(state: ckpt.TrainerState, key: str) -> float | None:
    """The newest value of `key` in the run's history."""
    values = [h[key] for h in state.history if h.get(key) is not None]
    return values[-1] if values else None


def _at_best(state: ckpt.TrainerState) -> float | None:
    """The validation accuracy of the best checkpoint's evaluation."""
    values = [h.get("val_accuracy") for h in state.history
              if h.get("step") == state.best_step and h.get("val_loss") == state.best_val_loss]
    return values[-1] if values else None


def _self_check(adapter_dir: Path, rank: int, base_ref: str) -> None:
    """The registry's own validation, so a finished run always yields a servable adapter."""
    from lorag.adapters.validate import model_module_names, validate_adapter

    validate_adapter(adapter_dir, served_model=base_ref, model_module_names=model_module_names(base_ref),
                     max_lora_rank=rank)
