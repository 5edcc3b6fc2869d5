"""`lorag adapters train NAME DATA.jsonl`: fine-tune a LoRA adapter, then register (and serve) it.

Registration goes the way every `lorag adapters` command goes (lorag.adapters.cli_backend): through
a running server's admin API, which hot-loads the new version, or into the registry in the
state directory when no server runs.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from lorag.adapters.cli_backend import AdapterBackend, pass_backend
from lorag.errors import LoragError

TARGETS_HELP = "Comma-separated leaf names of linear layers (q_proj,v_proj,...), or all-linear."


@click.command("train")
@click.argument("name")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_path", help="Base model path or HF id (default: the configured model.path).")
@click.option("--method", type=click.Choice(["supervised", "dpo"]), default="supervised", show_default=True,
              help="supervised: learn the assistant turns; dpo: learn to prefer each line's preferred answer "
                   "(OpenAI's preference format).")
@click.option("--beta", type=click.FloatRange(0, min_open=True), default=0.1, show_default=True,
              help="DPO's beta: larger keeps the adapter closer to the model it starts from.")
@click.option("--init-adapter", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Continue training this PEFT LoRA adapter (its own rank, alpha and target modules).")
@click.option("--val-data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Validate on this JSONL file (same format) instead of holding out --val-split of DATA.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default: <state>/training/NAME/<timestamp>).")
@click.option("--rank", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=click.IntRange(min=1), help="LoRA alpha (default: 2 x rank).")
@click.option("--target-modules", default="all-linear", show_default=True, help=TARGETS_HELP)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=2e-4, show_default=True, help="Peak learning rate.")
@click.option("--warmup-ratio", type=click.FloatRange(0, 1), default=0.03, show_default=True,
              help="Share of steps warming the rate up; it then decays linearly to 0.")
@click.option("--weight-decay", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--group-by-length/--no-group-by-length", default=True, show_default=True,
              help="Batch examples of similar length together: less padding, same examples per epoch.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--max-length", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Longest example in tokens; longer ones are refused, with their line.")
@click.option("--val-split", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Share of examples held out for validation loss.")
@click.option("--eval-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also evaluate every N steps (0: at epoch ends only).")
@click.option("--early-stopping-patience", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop after N evaluations without a better validation loss, keeping the best (0: off).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 (or fp16) autocast on a CUDA GPU, fp32 on CPU.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True,
              help="Trade compute for activation memory.")
@click.option("--qlora", is_flag=True, help="Train on a 4-bit (NF4) base model: needs CUDA and bitsandbytes.")
@click.option("--save-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Checkpoint every N steps, besides each epoch end (0: epoch ends only).")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue the newest unfinished run with the same settings and data from its last checkpoint.")
@click.option("--version", help="Version label to register (default: the next vN).")
@click.option("--no-activate", is_flag=True, help="Register without making it NAME's current version.")
@click.option("--serve", is_flag=True, help="Hot-load into the running server (required to answer; checked first).")
@click.option("--no-register", is_flag=True, help="Only train; register later with `lorag adapters add`.")
@pass_backend
def train_command(target: AdapterBackend, name: str, data: Path, model_path: str | None, method: str, beta: float,
                  init_adapter: Path | None, val_data: Path | None, output: Path | None, rank: int,
                  alpha: int | None, target_modules: str, dropout: float, lr: float,
                  warmup_ratio: float, weight_decay: float, epochs: int, batch_size: int, group_by_length: bool,
                  grad_accum: int,
                  max_length: int, val_split: float, eval_steps: int, early_stopping_patience: int, seed: int,
                  precision: str, gradient_checkpointing: bool, qlora: bool, save_steps: int,
                  keep_checkpoints: int, resume: bool, version: str | None, no_activate: bool, serve: bool,
                  no_register: bool) -> None:
    """Fine-tune a LoRA adapter NAME on the base model from the JSONL file DATA, and register it.

    DATA holds one example a line: {"messages": [...]} (chat, loss on the assistant turns)
    or {"prompt": ..., "completion": ...}; with --method dpo, {"input": {"messages": [...]},
    "preferred_output": [...], "non_preferred_output": [...]}. See docs/training.md.
    """
    from lorag.adapters.registry import check_name
    from lorag.adapters.train import TrainSettings, fingerprint

    settings = target.settings
    check_name(name, version)
    if serve and no_register:
        raise click.UsageError("--serve and --no-register contradict each other.")
    if serve:
        if target.client is None:
            raise LoragError("--serve needs a running server and none answers: start `lorag serve`, "
                             "or pass --server URL to `lorag adapters`.")
        target.call("GET", "/health")  # fail now, not after an hour of training
    base = model_path or settings.model.path
    if not base:
        raise LoragError("No base model: pass --model, or set model.path in lorag.toml.")
    if init_adapter is not None:  # the registry's checks, now: a LoRA adapter of this base model, servable
        rank = _init_adapter_rank(init_adapter, base, None if no_register else settings.engine.max_lora_rank)
    elif not no_register and rank > settings.engine.max_lora_rank:
        raise LoragError(f"--rank {rank} is above the engine's max_lora_rank {settings.engine.max_lora_rank}: "
                         "the server could not load the adapter. Lower --rank or raise engine.max_lora_rank.")
    train_settings = TrainSettings.build(
        model_path=base, tokenizer_path=None if model_path else settings.model.tokenizer,
        trust_remote_code=settings.model.trust_remote_code, method=method, beta=beta,
        init_adapter=None if init_adapter is None else str(init_adapter.resolve()), rank=rank,
        alpha=alpha or 2 * rank,
        target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()), dropout=dropout,
        learning_rate=lr, warmup_ratio=warmup_ratio, weight_decay=weight_decay, epochs=epochs,
        batch_size=batch_size, group_by_length=group_by_length, grad_accum=grad_accum, max_length=max_length, val_split=val_split,
        eval_steps=eval_steps, early_stopping_patience=early_stopping_patience, seed=seed, precision=precision,
        gradient_checkpointing=gradient_checkpointing, qlora=qlora, save_steps=save_steps,
        keep_checkpoints=keep_checkpoints,
    )
    run_dir = output or _default_run_dir(settings.state_path / "training" / name,
                                         fingerprint(train_settings, data, val_data) if resume else None)
    result = _train_with_progress(train_settings, data, run_dir, resume, name, val_data)
    val = "" if result.val_loss is None else f", val loss {result.initial_val_loss:.4f} -> {result.val_loss:.4f}"
    if result.val_accuracy is not None:
        val += f", val accuracy {result.val_accuracy:.3f}"
    resumed = f" (resumed at step {result.resumed_from_step})" if result.resumed_from_step else ""
    click.echo(f"trained {name}: {result.steps} steps{resumed}, train loss {result.train_loss:.4f}{val}, "
               f"{result.tokens_per_second:,.0f} tokens/s -> {result.adapter_dir}")
    if not no_register:
        if model_path:  # the local registry validates against the model it was trained on
            target.settings = settings.model_copy(update={"model": settings.model.model_copy(update={"path": base})})
        _register(target, name, result.adapter_dir, version, not no_activate)


def _default_run_dir(runs_root: Path, resumable: dict[str, Any] | None) -> Path:
    """The newest unfinished run of NAME with the same settings and data, else a new timestamped one."""
    from lorag.adapters.checkpoints import find_resumable_run

    if resumable is not None:
        found = find_resumable_run(runs_root, resumable)
        if found is not None:
            return found
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = runs_root / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = runs_root / f"{stamp}-{n}"
    return run_dir


def _init_adapter_rank(adapter: Path, base: str, max_lora_rank: int | None) -> int:
    """The rank an --init-adapter trains at (its own), once the registry's validation accepts it."""
    from lorag.adapters.validate import model_module_names, validate_adapter

    info = validate_adapter(adapter, served_model=base, model_module_names=model_module_names(base),
                            max_lora_rank=max_lora_rank or sys.maxsize)
    return info.rank


def _train_with_progress(settings: Any, data: Path, run_dir: Path, resume: bool, name: str,
                         val_data: Path | None = None) -> Any:
    """Run training behind a tqdm bar (steps, loss, accuracy, validation loss); no bar when stderr is not a terminal."""
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from lorag.adapters.train import TrainProgress, train

    hf_logging.disable_progress_bar()  # one bar: ours

    bar: Any = None
    postfix: dict[str, str] = {}

    def progress(event: TrainProgress) -> None:
        nonlocal bar
        if event.kind == "start":
            bar = tqdm(total=event.total_steps, initial=event.step, desc=f"training {name}", unit="step",
                       disable=None, dynamic_ncols=True)
        elif bar is None:
            return
        elif event.kind == "step":
            postfix["loss"] = f"{event.loss:.4f}"
            postfix["acc"] = f"{event.accuracy:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        elif event.kind == "eval":
            postfix["val"] = f"{event.val_loss:.4f}"
            postfix["val_acc"] = f"{event.val_accuracy:.3f}"
            bar.set_postfix(postfix)
        elif event.kind == "end":
            bar.close()

    with _logs_above_the_bar():
        try:
            return train(settings, data, run_dir, resume=resume, progress=progress, val_data=val_data)
        finally:
            if bar is not None:
                bar.close()


@contextmanager
def _logs_above_the_bar() -> Iterator[None]:
    """On a terminal, print log events through tqdm so they land above the bar, not inside it."""
    import structlog
    from tqdm.contrib import DummyTqdmFile

    if not sys.stderr.isatty():
        yield
        return
    before = structlog.get_config()["logger_factory"]
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=DummyTqdmFile(sys.stderr)))
    try:
        yield
    finally:
        structlog.configure(logger_factory=before)


def _register(target: AdapterBackend, name: str, adapter_dir: Path, version: str | None, activate: bool) -> None:
    """Through the server's admin API (hot-loaded) when one answers, else into the local registry."""
    from lorag.adapters.registry import version_to_json

    try:
        if target.client is not None:
            body = {"name": name, "path": str(adapter_dir.resolve()), "version": version, "activate": activate}
            entry = target.call("POST", "/admin/adapters", json=body)
            where = "served"
        else:
            added = asyncio.run(target.service().add(name, adapter_dir, version=version, activate=activate,
                                                     trusted=True))
            entry, where = version_to_json(added), "registered"
    except LoragError as err:
        raise LoragError(f"{err.message}\nThe trained adapter is kept at {adapter_dir}; register it with "
                         f"`lorag adapters add {name} {adapter_dir}`.") from None
    click.echo(f"{where} {entry['name']}@{entry['version']} (lora_int_id {entry['lora_int_id']}, rank {entry['rank']})")
