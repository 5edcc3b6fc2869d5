"""The training worker: one process per running job, started by the server's runner.

`python -m lorag.finetune.worker <job-dir>` trains with the `lorag adapters train` code path
(lorag.adapters.train) into `<job-dir>/run`, resuming from its last checkpoint when there is
one, and reports through files only: events (events.jsonl) and its progress and outcome
(worker.json). It never touches the registry: the server registers what it made, after the
canary. Threads (and GPU memory) are capped so the engine beside it keeps its share, and it
dies with the server (PR_SET_PDEATHSIG), so a killed server never leaves a trainer behind.

Exit codes: 0 trained (outcome in worker.json), 3 the data or settings are at fault (the
job fails with that error), 4 stopped on request after a checkpoint (pause); anything else
is a crash the runner retries from the last checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 3
EXIT_STOPPED = 4
PROGRESS_EVERY_S = 1.0  # worker.json (step, estimate) at most this often: two fsyncs a write


def die_with_parent(parent: int) -> None:
    """Linux: SIGKILL when the server process goes; and if it went already, go now."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def cap_resources(threads: int, gpu_fraction: float) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(max(1, min(threads, 2)))
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(gpu_fraction)


def main(job_dir: Path) -> int:
    from lorag.finetune.jobs import read_worker

    job = _read_job(job_dir)
    die_with_parent(int(os.environ.get("LORAG_WORKER_PARENT", os.getppid())))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cap_resources(job["limits"]["threads"], job["limits"]["gpu_memory_fraction"])
    previous = read_worker(job_dir)
    report = Reporter(job_dir, previous)
    try:
        return _train(job, job_dir, report, stop)
    except BaseException:
        report.write(outcome="crashed")
        raise


def _read_job(job_dir: Path) -> dict[str, Any]:
    import json

    from lorag.finetune.jobs import JOB_FILE

    job: dict[str, Any] = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
    return job


def _train(job: dict[str, Any], job_dir: Path, report: Reporter, stop: threading.Event) -> int:
    from lorag.adapters.data import TrainingDataError
    from lorag.adapters.train import TrainingStopped, train
    from lorag.adapters.train_settings import TrainSettings
    from lorag.errors import LoragError
    from lorag.finetune.jobs import RUN_DIR, TRAINING_DATA, VALIDATION_DATA, data_error

    data = job_dir / TRAINING_DATA
    validation = job_dir / VALIDATION_DATA if (job_dir / VALIDATION_DATA).is_file() else None
    try:
        settings = TrainSettings.build(**job["train_settings"])
        result = train(settings, data, job_dir / RUN_DIR, resume=True, progress=report.progress,
                       val_data=validation, should_stop=stop.is_set)
        expectations = _canary_expectations(job, settings, result.adapter_dir, validation or data)
    except TrainingStopped as stopped:
        report.event(f"Paused at step {stopped.step}; a checkpoint was saved there.")
        report.write(outcome="stopped", step=stopped.step)
        return EXIT_STOPPED
    except TrainingDataError as err:
        which = "validation_file" if validation is not None and Path(err.path) == validation else "training_file"
        report.write(outcome="failed", error=data_error(err, which, job[which]))
        return EXIT_BAD_INPUT
    except LoragError as err:
        report.write(outcome="failed", error={"code": err.code or "training_failed", "message": err.message,
                                              "param": err.param})
        return EXIT_BAD_INPUT
    report.write(outcome="trained", adapter=str(result.adapter_dir), steps=result.steps,
                 total_tokens=result.total_tokens, train_loss=result.train_loss, val_loss=result.val_loss,
                 val_accuracy=result.val_accuracy, canary=[e.to_json() for e in expectations])
    return 0


def _canary_expectations(job: dict[str, Any], settings: Any, adapter_dir: Path, data: Path) -> list[Any]:
    """transformers + peft's greedy answers (adapter on and off) to the first prompts of the job's data."""
    count = int(job["canary"]["prompts"])
    if count == 0:
        return []
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorag.adapters.train_model import load_tokenizer
    from lorag.finetune.canary import pick_prompts, reference_answers, stop_ids

    tokenizer = load_tokenizer(settings)
    max_tokens = int(job["canary"]["max_tokens"])
    prompts = pick_prompts(data, settings.method, tokenizer, count, settings.max_length)
    base = AutoModelForCausalLM.from_pretrained(settings.model_path, dtype=torch.float32,
                                                trust_remote_code=settings.trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    stops = stop_ids(settings.model_path, tokenizer)
    return reference_answers(model, prompts, max_tokens, stops)


class Reporter:
    """Training progress -> the job's events (one metrics event per step) and worker.json."""

    def __init__(self, job_dir: Path, previous: dict[str, Any]) -> None:
        self.job_dir = job_dir
        self.state: dict[str, Any] = {"checkpoints": previous.get("checkpoints", []), "pid": os.getpid()}
        self.started = time.time()
        self.first_step: int | None = None
        self.written = float("-inf")
        self.train: dict[str, Any] = {}  # the latest step's metrics, and the latest evaluation's:
        self.valid: dict[str, Any] = {}  # a checkpoint records both

    def event(self, message: str, **kwargs: Any) -> None:
        from lorag.finetune.jobs import add_event

        add_event(self.job_dir, message, **kwargs)

    def write(self, **fields: Any) -> None:
        from lorag.finetune.jobs import write_worker

        self.state.update(fields)
        write_worker(self.job_dir, self.state)
        self.written = time.monotonic()

    def progress(self, event: Any) -> None:
        """One event per step (training metrics) and per evaluation (validation metrics), as OpenAI logs them."""
        if event.kind == "start":
            self.first_step = event.step
            resumed = f", resumed from step {event.step}" if event.step else ""
            self.event(f"Fine-tuning started: {event.total_steps} steps{resumed}.")
            self.write(step=event.step, total_steps=event.total_steps, started_at=self.started, outcome="running")
        elif event.kind == "step":
            self.train = {"train_loss": event.loss, "train_mean_token_accuracy": event.accuracy}
            accuracy = "" if event.accuracy is None else f", token accuracy={event.accuracy:.3f}"
            self.event(f"Step {event.step}/{event.total_steps}: training loss={event.loss:.4f}{accuracy}",
                       kind="metrics", data={"step": event.step, "total_steps": event.total_steps, **self.train})
            if time.monotonic() - self.written >= PROGRESS_EVERY_S or event.step == event.total_steps:
                self.write(step=event.step, total_steps=event.total_steps, tokens=event.tokens,
                           estimated_finish=self._estimate(event.step, event.total_steps))
        elif event.kind == "eval":
            self.valid = {"valid_loss": event.val_loss, "valid_mean_token_accuracy": event.val_accuracy,
                          "full_valid_loss": event.val_loss, "full_valid_mean_token_accuracy": event.val_accuracy}
            self.event(f"Step {event.step}/{event.total_steps}: validation loss={event.val_loss:.4f}",
                       kind="metrics", data={"step": event.step, "total_steps": event.total_steps, **self.valid})
        elif event.kind == "checkpoint":
            metrics = {"step": event.step, **self.train, **self.valid}
            record = {"step": event.step, "created_at": int(time.time()), "path": str(event.path), "metrics": metrics}
            self.state["checkpoints"] = [c for c in self.state["checkpoints"] if c["step"] != event.step] + [record]
            self.event(f"Checkpoint created at step {event.step}.")
            self.write()
        elif event.kind == "end":
            self.event(f"Training finished at step {event.step}; checking the adapter before it goes live.")

    def _estimate(self, step: int, total: int) -> int | None:
        done = step - (self.first_step or 0)
        if done <= 0:
            return None
        per_step = (time.time() - self.started) / done
        return int(time.time() + per_step * (total - step))


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
