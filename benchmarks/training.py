"""Training benchmark: `lorag adapters train` vs a plain peft + transformers loop, same model, data and settings.

    .venv/bin/python benchmarks/training.py [--examples 128] [--epochs 2] [--rounds 5] [--threads 1]

On a real model (issue 11: SmolLM2-135M-Instruct as an HF folder; ~130 tokens/s on 2 cores):

    .venv/bin/python benchmarks/training.py --model /tmp/smollm2-hf --examples 32 --epochs 1 --rounds 3 --threads 1

Three runs take turns in each round (the order rotates): plain (the baseline), lorag with the
plain loop's batches (--no-group-by-length: the same work, so the ratio is lorag's overhead)
and lorag as shipped (length-grouped batches: less padding, so more tokens per second). All on a tiny Llama
(hidden 256, 4 layers, random weights) built in a temp dir, or on --model, on the same tokenized chat
examples, LoRA (rank 16, all linear layers), AdamW, linear schedule, gradient clipping,
batch size, max length, epochs and seed. lorag's side is what the CLI runs (progress
callback, epoch-end checkpoints, final save and validation); the plain loop saves its
adapter once at the end. Both tokenize the data inside the timed call. Throughput counts
input tokens (padding excluded):
 - loop:       tokens / time in the training loop (lorag: TrainResult.seconds, which
               includes its epoch-end checkpoints);
 - end to end: tokens / whole call (model load, tokenization, training, saving);
 - cpu:        tokens / CPU seconds of the whole call: with one torch thread this is the
               work done, and it is far less disturbed than wall time when other
               processes share the cores.
Prints medians over rounds and the ratios to plain. Target: lorag (same batches) >= 0.95x.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorag.adapters.batches import collate  # noqa: E402
from lorag.adapters.data import load_examples  # noqa: E402
from lorag.adapters.train_model import resolve_target_modules  # noqa: E402
from lorag.adapters.train_settings import TrainSettings  # noqa: E402
from lorag.demo.devmodel import TINY_CORPUS, build_tiny_model  # noqa: E402

WORDS = TINY_CORPUS.split()


def write_data(path: Path, n: int, seed: int) -> Path:
    """Chat examples of varied length (~30-250 tokens) from the tokenizer's own corpus words."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            question = " ".join(rng.choices(WORDS, k=rng.randint(5, 25)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def run_lorag(settings: TrainSettings, data: Path, run_dir: Path) -> dict[str, float]:
    from lorag.adapters.train_cli import _train_with_progress

    started, cpu_started = time.perf_counter(), time.process_time()
    result = _train_with_progress(settings, data, run_dir, False, "bench")
    total = time.perf_counter() - started
    return {"tokens": result.tokens, "loop_s": result.seconds, "total_s": total, "steps": result.steps,
            "cpu_s": time.process_time() - cpu_started}


def run_plain(settings: TrainSettings, data: Path, out: Path) -> dict[str, float]:
    """The loop a person writes with peft + transformers: no checkpoints, no callbacks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started, cpu_started = time.perf_counter(), time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    examples = load_examples(data, tokenizer, settings.max_length)
    pad_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(settings.model_path, dtype=torch.float32)
    model.config.use_cache = False
    torch.manual_seed(settings.seed)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=resolve_target_modules(model, settings.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    warmup = int(total_steps * settings.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    peft_model.train()
    tokens = 0
    loop_started = time.perf_counter()
    for epoch in range(settings.epochs):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)).tolist()
        for start in range(0, len(order), settings.batch_size):
            chunk = [examples[i] for i in order[start : start + settings.batch_size]]
            batch = collate(chunk, pad_id, "cpu")
            loss = peft_model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += sum(len(e.input_ids) for e in chunk)
            loss.item()  # a loop that prints its loss reads it
    loop_s = time.perf_counter() - loop_started
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return {"tokens": tokens, "loop_s": loop_s, "total_s": time.perf_counter() - started, "steps": total_steps,
            "cpu_s": time.process_time() - cpu_started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="an HF model folder (default: a tiny random Llama built in a temp dir)")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (this machine's cores are shared)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lorag.logging import configure_logging

    configure_logging(level="warning")
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lorag-train-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model.resolve() if args.model else build_tiny_model(tmp / "model", hidden_size=256, layers=4)
        data = write_data(tmp / "data.jsonl", args.examples, seed=0)
        settings = TrainSettings(model_path=str(model), rank=16, alpha=32, dropout=0.05, learning_rate=2e-4,
                                 epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                                 val_split=0, seed=0)
        same_batches = settings.model_copy(update={"group_by_length": False})
        examples = load_examples(data, AutoTokenizer.from_pretrained(str(model)), args.max_length)
        described = f"{model}" if args.model else "tiny, hidden 256, 4 layers"
        print(f"model: {described}; {len(examples)} examples, "
              f"{sum(len(e.input_ids) for e in examples)} tokens/epoch, {args.epochs} epochs, "
              f"batch {args.batch_size}, rank 16 all-linear, {args.threads} thread(s)")
        runs = {
            "plain": lambda out: run_plain(same_batches, data, out),
            "lorag_same_batches": lambda out: run_lorag(same_batches, data, out),
            "lorag_grouped": lambda out: run_lorag(settings, data, out),
        }
        results: dict[str, list[dict[str, float]]] = {which: [] for which in runs}
        names = list(runs)
        for round_ in range(args.rounds):
            for which in names[round_ % 3:] + names[: round_ % 3]:
                result = runs[which](tmp / f"{which}-{round_}")
                results[which].append(result)
                print(f"round {round_ + 1} {which:18s}: {result['steps']:.0f} steps, "
                      f"loop {result['tokens'] / result['loop_s']:8.0f} tok/s, "
                      f"end to end {result['tokens'] / result['total_s']:8.0f} tok/s, "
                      f"cpu {result['tokens'] / result['cpu_s']:8.0f} tok/s, load average "
                      + "/".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
        summary: dict[str, Any] = {}
        for which, rows in results.items():
            summary[which] = {
                "loop": statistics.median(r["tokens"] / r["loop_s"] for r in rows),
                "end_to_end": statistics.median(r["tokens"] / r["total_s"] for r in rows),
                "cpu": statistics.median(r["tokens"] / r["cpu_s"] for r in rows),
            }
        for kind in ("loop", "end_to_end", "cpu"):
            plain = summary["plain"][kind]
            print(f"median {kind:10s}: plain {plain:8.0f} tok/s; lorag same batches "
                  f"{summary['lorag_same_batches'][kind]:8.0f} tok/s, ratio "
                  f"{summary['lorag_same_batches'][kind] / plain:.3f} (target >= 0.95); lorag grouped "
                  f"{summary['lorag_grouped'][kind]:8.0f} tok/s, ratio {summary['lorag_grouped'][kind] / plain:.3f}")


if __name__ == "__main__":
    main()
