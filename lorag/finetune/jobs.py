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

Where the records live is the `JobRecords` given: job.json itself (`DirJobRecords`, the default),
or a PostgreSQL row for every replica (lorag.finetune.records_pg, `[state] backend = "postgres"`,
the directories then under the shared directory; job.json is then the row's copy for the worker,
which reads its settings there). A record changes by read-change-write under a lock every process
honours: an flock on the job's job.lock, or the row's lock; so a cancel from one process is never
overwritten by another's progress update.
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
from typing import Any, Literal, Protocol

from lorag.adapters.checkpoints import write_dir_atomically, write_json_atomically
from lorag.adapters.data import DataFileError
from lorag.errors import NotFoundError
from lorag.finetune.naming import new_id

JOB_FILE = "job.json"
JOB_LOCK = "job.lock"  # flocked around each change of job.json (files backend)
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


class JobRecords(Protocol):
    """Where the jobs' records live; a job is known by its directory (its name is the job's id)."""

    def create(self, job_dir: Path, record: dict[str, Any], fill: Callable[[Path], None]) -> None:
        """The directory, whole (`fill(staging)` copies the data in), then its record."""

    def read(self, job_dir: Path) -> dict[str, Any] | None: ...

    def update(self, job_dir: Path, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Atomic read-change-write against every process; None when there is no such job."""

    def all(self, root: Path) -> list[dict[str, Any]]: ...


class DirJobRecords:
    """job.json in each job directory; changes under an flock on the job's job.lock."""

    def create(self, job_dir: Path, record: dict[str, Any], fill: Callable[[Path], None]) -> None:
        write_dir_atomically(job_dir, with_record(record, fill))

    def read(self, job_dir: Path) -> dict[str, Any] | None:
        path = job_dir / JOB_FILE
        if not path.is_file():
            return None
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return record

    def update(self, job_dir: Path, changes: dict[str, Any]) -> dict[str, Any] | None:
        if not (job_dir / JOB_FILE).is_file():
            return None
        with _locked(job_dir / JOB_LOCK):  # other processes on this state directory take turns too
            record = self.read(job_dir)
            if record is None:
                return None
            record.update(changes)
            write_json_atomically(job_dir / JOB_FILE, record)
            return record

    def all(self, root: Path) -> list[dict[str, Any]]:
        records = []
        for child in root.iterdir():
            if child.is_dir() and not child.name.startswith("."):
                try:
                    found = self.read(child)
                except (OSError, json.JSONDecodeError):
                    continue
                if found is not None:
                    records.append(found)
        return records


def with_record(record: dict[str, Any], fill: Callable[[Path], None]) -> Callable[[Path], None]:
    """`fill`, then the record written as job.json into the staging directory."""

    def build(staging: Path) -> None:
        fill(staging)
        (staging / JOB_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")

    return build


class JobStore:
    """The jobs under `<state_dir>/fine_tuning/jobs`, their records where `records` keeps them."""

    def __init__(self, state_dir: Path, records: JobRecords | None = None) -> None:
        self.root = state_dir / "fine_tuning" / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.records: JobRecords = records or DirJobRecords()
        self._lock = threading.RLock()
        self._events: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # job id -> (bytes read, events)

    def dir_of(self, job_id: str) -> Path:
        return self.root / job_id

    # -- records -------------------------------------------------------------------------

    def create(self, record: dict[str, Any], fill: Callable[[Path], None]) -> dict[str, Any]:
        """A new job directory, whole: `fill(staging)` copies its data in, then the record is written."""
        with self._lock:
            self.records.create(self.dir_of(record["id"]), record, fill)
        return record

    def get(self, job_id: str) -> dict[str, Any]:
        record = self.records.read(self.dir_of(job_id)) if _well_formed(job_id) else None
        if record is None:
            raise _not_found(job_id)
        return record

    def update(self, job_id: str, **changes: Any) -> dict[str, Any]:
        """Change fields of a record: read, change and write as one step for every process (the
        store's thread lock, and the records' own lock across processes)."""
        with self._lock:
            record = self.records.update(self.dir_of(job_id), changes) if _well_formed(job_id) else None
            if record is None:
                raise _not_found(job_id)
            return record

    def all(self) -> list[dict[str, Any]]:
        """Every job, oldest first (the queue's order)."""
        return sorted(self.records.all(self.root), key=queue_order)

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


def queue_order(record: dict[str, Any]) -> tuple[int, str]:
    return int(record.get("created_ns") or record["created_at"] * 10**9), str(record["id"])


def _well_formed(job_id: str) -> bool:
    return job_id.startswith("ftjob-") and "/" not in job_id


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"No fine-tuning job '{job_id}'.", param="fine_tuning_job_id")


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
