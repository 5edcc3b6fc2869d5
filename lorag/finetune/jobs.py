"""Fine-tuning jobs on disk: the persistent queue the runner works from, and each job's event log.

```
<state>/fine_tuning/jobs/<ftjob-id>/job.json        the record (written by the server only, atomically)
                                    training.jsonl  the data, copied in when the job was made (the
                                    validation.jsonl  caller may delete the file; the job keeps its data)
                                    init_adapter/   the adapter it continues from, if any (copied too)
                                    events.jsonl    events, appended by the server and the worker
                                    worker.json     the worker's progress and outcome (the worker's only)
                                    worker.log      the worker's output
                                    run/            the training run: checkpoints, adapter, result.json
```

A job directory appears whole (filled under a staging name, then renamed), so the queue never
holds a job without its data.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from lorag.adapters.checkpoints import write_dir_atomically, write_json_atomically
from lorag.adapters.data import DataFileError
from lorag.errors import NotFoundError
from lorag.finetune.naming import new_id

JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
WORKER_FILE = "worker.json"
WORKER_LOG = "worker.log"
TRAINING_DATA = "training.jsonl"
VALIDATION_DATA = "validation.jsonl"
PROMOTION_DATA = "promotion_eval.jsonl"
INIT_ADAPTER = "init_adapter"
RUN_DIR = "run"
ACTIVE = ("validating_files", "queued", "running", "paused")
FINISHED = ("succeeded", "failed", "cancelled")
# What the API shows of a record; the rest (owner, attempts, the training settings, ...) is lorag's.
PUBLIC = ("id", "object", "created_at", "model", "organization_id", "status", "training_file", "validation_file",
          "hyperparameters", "method", "seed", "suffix", "metadata", "fine_tuned_model", "finished_at", "error",
          "result_files", "trained_tokens", "estimated_finish", "integrations", "user_provided_suffix",
          "promote", "promotion")  # the last two are lorag's: the gate into a domain, and what it decided
Level = Literal["info", "warn", "error"]


class JobNotFound(NotFoundError):
    code = "fine_tuning_job_not_found"


def public(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record.get(key) for key in PUBLIC}


class JobStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "fine_tuning" / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._events: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # job id -> (bytes read, events)

    def dir_of(self, job_id: str) -> Path:
        return self.root / job_id

    # -- records -------------------------------------------------------------------------

    def create(self, record: dict[str, Any], fill: Callable[[Path], None]) -> dict[str, Any]:
        """A new job directory, whole: `fill(staging)` copies its data in, then the record is written."""

        def build(staging: Path) -> None:
            fill(staging)
            (staging / JOB_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")

        with self._lock:
            write_dir_atomically(self.dir_of(record["id"]), build)
        return record

    def get(self, job_id: str) -> dict[str, Any]:
        path = self.dir_of(job_id) / JOB_FILE
        if not job_id.startswith("ftjob-") or "/" in job_id or not path.is_file():
            raise JobNotFound(f"No fine-tuning job '{job_id}'.", param="fine_tuning_job_id")
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return record

    def update(self, job_id: str, **changes: Any) -> dict[str, Any]:
        """Change fields of a record (read, change, write atomically, under the store's lock)."""
        with self._lock:
            record = self.get(job_id)
            record.update(changes)
            write_json_atomically(self.dir_of(job_id) / JOB_FILE, record)
            return record

    def all(self) -> list[dict[str, Any]]:
        """Every job, oldest first (the queue's order)."""
        records = []
        for child in self.root.iterdir():
            if child.is_dir() and not child.name.startswith(".") and (child / JOB_FILE).is_file():
                try:
                    records.append(self.get(child.name))
                except (OSError, json.JSONDecodeError):
                    continue
        return sorted(records, key=lambda r: (r.get("created_ns", r["created_at"] * 10**9), r["id"]))

    # -- events --------------------------------------------------------------------------

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events, newest first (as OpenAI lists them).

        A job logs an event per step (tens of thousands of lines); each call reads only what
        was appended since the last one (the file only grows).
        """
        path = self.dir_of(job_id) / EVENTS_FILE
        with self._lock:
            offset, found = self._events.get(job_id, (0, []))
            try:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    added = handle.read()
            except OSError:
                return []
            complete = added[: added.rfind(b"\n") + 1]  # a line still being written waits for the next call
            for line in complete.splitlines():
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill -9 mid-write
                    continue
            self._events[job_id] = (offset + len(complete), found)
            return found[::-1]


def add_event(job_dir: Path, message: str, *, level: Level = "info", kind: Literal["message", "metrics"] = "message",
              data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append one event; the server and the worker both write, so each line goes in under a lock."""
    event = {"object": "fine_tuning.job.event", "id": new_id("ftevent"), "created_at": int(time.time()),
             "level": level, "message": message, "type": kind, "data": data or {}}
    with _locked(job_dir / EVENTS_FILE) as handle:
        torn = handle.tell() > 0 and _last_byte(job_dir / EVENTS_FILE) != b"\n"  # a writer killed mid-line
        handle.write(("\n" if torn else "") + json.dumps(event) + "\n")
        handle.flush()
    return event


@contextmanager
def _locked(path: Path) -> Iterator[Any]:
    with path.open("a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1)


def read_worker(job_dir: Path) -> dict[str, Any]:
    """The worker's progress and outcome, {} before it wrote any."""
    try:
        data = json.loads((job_dir / WORKER_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_worker(job_dir: Path, data: dict[str, Any]) -> None:
    write_json_atomically(job_dir / WORKER_FILE, data)


def data_error(err: DataFileError, param: str, file_id: str) -> dict[str, Any]:
    """The job's `error` for a file at fault: its problems by line, under the caller's file id."""
    message = err.message.replace(f"{err.path}:", f"The {param.replace('_', ' ')} {file_id} has", 1)
    message = message.replace("raise --max-length", "ask for a higher [fine_tuning] max_length")  # the CLI's flag
    return {"code": f"invalid_{param}", "param": param, "message": message}


def copy_data(source: Path, target: Path) -> None:
    """A hard link where the file system allows (uploads are immutable), else a copy."""
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copy2(source, target)
