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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorag.adapters import checkpoints as ckpt
from lorag.adapters.data import IGNORE, Example, file_digest, load_examples
from lorag.errors import LoragError
from lorag.logging import get_logger

log = get_logger("lorag.adapters.train")

ALL_LINEAR = "all-linear"
# Settings that change how a run is saved, not what it computes: a resume may change them.
RESUME_FREE = ("save_steps", "keep_checkpoints", "gradient_checkpointing")
# Batches per window that length grouping sorts (transformers' LengthGroupedSampler uses 50 too):
# wide enough to find similar lengths, narrow enough to keep the epoch's order random.
LENGTH_GROUP_BATCHES = 50


class TrainSettings(BaseModel):
    """Everything that decides what is trained (flags of `lorag adapters train`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str = Field(min_length=1)
    tokenizer_path: str | None = None
    trust_remote_code: bool = False
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
    tokenizer = _load_tokenizer(settings)
    examples = load_examples(data, tokenizer, settings.max_length)
    train_set, val_set = split(examples, settings.val_split, settings.seed)
    if settings.early_stopping_patience and not val_set:
        raise LoragError("Early stopping needs validation data: set --val-split above 0.")
    checkpoint = ckpt.prepare_run(run_dir, fingerprint(settings, data), resume)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = _amp_dtype(settings.precision, device)
    model, targets = _build_model(settings, device, amp_dtype)
    pad_id = _pad_id(tokenizer)
    head_positions = takes_logits_to_keep(model)
    micro_batches = math.ceil(len(train_set) / settings.batch_size)
    steps_per_epoch = math.ceil(micro_batches / settings.grad_accum)
    total_steps = steps_per_epoch * settings.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(settings.warmup_ratio, total_steps))
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
        return _evaluate(model, val_set, settings.batch_size, pad_id, device, amp_dtype, head_positions)

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
            labelled = sum(_predicted_tokens(e) for e in chunk)
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


# -- data -----------------------------------------------------------------------------


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


def _predicted_tokens(example: Example) -> int:
    """Tokens the loss averages over: labelled ones, less the first (nothing predicts it)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def _batches(examples: list[Example], size: int) -> Iterator[list[Example]]:
    for start in range(0, len(examples), size):
        yield examples[start : start + size]


# -- model ----------------------------------------------------------------------------


def _load_tokenizer(settings: TrainSettings) -> Any:
    from transformers import AutoTokenizer

    source = settings.tokenizer_path or settings.model_path
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise LoragError(f"Cannot load the tokenizer of {source}: {err}") from None


def _amp_dtype(precision: str, device: Any) -> Any:
    """Mixed precision only where it pays and works: CUDA (bf16 where supported, else fp16)."""
    import torch

    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise LoragError(f"--precision {precision} needs a CUDA GPU; on CPU training runs in fp32.")
        return None
    if precision == "fp32":
        return None
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise LoragError("This GPU does not support bf16; use --precision fp16 or auto.")
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _build_model(settings: TrainSettings, device: Any, amp_dtype: Any) -> tuple[Any, list[str]]:
    """The base model (4-bit with --qlora) wrapped with a fresh LoRA adapter; returns it and its targets."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": amp_dtype or torch.float32, "trust_remote_code": settings.trust_remote_code}
    if settings.qlora:
        kwargs.update(_qlora_kwargs(device, amp_dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(settings.model_path, **kwargs)
    except (OSError, ValueError) as err:
        raise LoragError(f"Cannot load the base model {settings.model_path}: {err}") from None
    if not settings.qlora:
        model.to(device)
    model.config.use_cache = False
    targets = resolve_target_modules(model, settings.target_modules)
    if settings.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(settings.seed)  # the LoRA A matrices' initialisation
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), targets


def _qlora_kwargs(device: Any, amp_dtype: Any) -> dict[str, Any]:
    import torch

    if device.type != "cuda":
        raise LoragError("--qlora needs a CUDA GPU and none is available; train a plain LoRA adapter without --qlora.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoragError("--qlora needs bitsandbytes, which is not installed: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=amp_dtype or torch.float32,
    )
    return {"quantization_config": quantization, "device_map": {"": device.index or 0}}


def resolve_target_modules(model: Any, requested: tuple[str, ...]) -> list[str]:
    """Leaf names of the linear layers to adapt ('all-linear': all but the output head).

    Leaf names, not peft's full module paths: the registry and the engine match adapters
    to the model by leaf name (q_proj, ...).
    """
    import torch

    head = model.get_output_embeddings()
    linear = sorted({
        name.rsplit(".", 1)[-1] for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and name
    })
    if tuple(requested) == (ALL_LINEAR,):
        return linear
    unknown = sorted(set(requested) - set(linear))
    if unknown:
        raise LoragError(
            f"Target modules {', '.join(unknown)} are not linear layers of this model "
            f"(it has: {', '.join(linear)}; or use {ALL_LINEAR})."
        )
    return sorted(set(requested))


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _linear_schedule(warmup_ratio: float, total_steps: int) -> Callable[[int], float]:
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _evaluate(model: Any, examples: list[Example], batch_size: int, pad_id: int, device: Any, amp_dtype: Any,
              head_positions: bool) -> float:
    """Mean loss per assistant token over the validation set."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for chunk in _batches(examples, batch_size):
            n = sum(_predicted_tokens(e) for e in chunk)
            total += float(batch_loss(model, collate(chunk, pad_id, device), head_positions)) * n
            count += n
    model.train()
    return total / max(count, 1)


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
