"""The file store and job store a configuration uses: records and blobs in the state directory
(the default), or records in PostgreSQL and blobs under `[state] shared_dir`, shared by every
replica (`[state] backend = "postgres"`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorag.finetune.files import FileStore
from lorag.finetune.jobs import JobStore
from lorag.state.session import StateSession

if TYPE_CHECKING:
    from lorag.config import Settings

SHARED_DIR = "fine_tuning"  # under the shared directory: files/<file-id>/content, jobs/<ftjob-id>/...


def open_file_store(settings: Settings) -> FileStore:
    max_bytes = settings.fine_tuning.max_file_bytes
    if settings.state.backend != "postgres":
        return FileStore(settings.state_path, max_bytes)
    from lorag.finetune.records_pg import CHANNEL, FileRows

    root = settings.shared_path / SHARED_DIR
    return FileStore(root, max_bytes, records=FileRows(StateSession(settings.state.url, CHANNEL), root / "files"))


def open_job_store(settings: Settings) -> JobStore:
    if settings.state.backend != "postgres":
        return JobStore(settings.state_path)
    from lorag.finetune.records_pg import CHANNEL, JobRows

    return JobStore(settings.shared_path, JobRows(StateSession(settings.state.url, CHANNEL)))
