"""Fine-tuning files' and jobs' records in PostgreSQL (`[state] backend = "postgres"`), for every replica.

Only the records move: a file's content and a job's directory (its data, events, worker files,
checkpoints) stay files, under `[state] shared_dir`, which every replica mounts. Blobs go in
first and the row second, so no replica ever sees a record whose bytes are not there yet; a
crash between the two leaves a folder no record names (nobody sees it).

A job's record changes in one transaction holding its row (SELECT ... FOR UPDATE): a cancel
written through one replica and the leader's progress update take turns, each on the latest
record. Each change also rewrites the job directory's job.json, still under the row lock: the
training worker reads its settings there (lorag.finetune.worker).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from lorag.adapters.checkpoints import fsync_path, write_dir_atomically, write_json_atomically
from lorag.finetune.files import remove_folder
from lorag.finetune.jobs import JOB_FILE, queue_order, with_record
from lorag.logging import get_logger
from lorag.state.session import StateSession

log = get_logger("lorag.finetune")
CHANNEL = "lorag_fine_tuning"  # nothing listens: every read asks the database


class FileRows:
    """FileRecords over the `fine_tuning_files` table; the contents under `root`."""

    def __init__(self, session: StateSession, root: Path) -> None:
        self.session = session
        self.root = root

    def publish(self, folder: Path, meta: dict[str, Any]) -> None:
        fsync_path(folder)
        target = self.root / meta["id"]
        folder.rename(target)
        fsync_path(self.root)
        try:
            self.session.run(lambda conn: conn.execute(
                "INSERT INTO fine_tuning_files (id, created_ns, record) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (meta["id"], meta["created_ns"], Jsonb(meta))))  # no conflict but a retried insert's (random ids)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    def read(self, file_id: str) -> dict[str, Any] | None:
        row = self.session.run(lambda conn: conn.execute(
            "SELECT record FROM fine_tuning_files WHERE id = %s", (file_id,)).fetchone())
        return dict(row[0]) if row else None

    def all(self) -> list[dict[str, Any]]:
        rows = self.session.run(lambda conn: conn.execute(
            "SELECT record FROM fine_tuning_files ORDER BY created_ns, id").fetchall())
        return [dict(row[0]) for row in rows]

    def rewrite(self, meta: dict[str, Any]) -> None:
        updated = self.session.run(lambda conn: conn.execute(
            "UPDATE fine_tuning_files SET record = %s WHERE id = %s", (Jsonb(meta), meta["id"])).rowcount)
        if not updated:
            raise FileNotFoundError(meta["id"])  # deleted meanwhile (FileStore.replace_content's signal)

    def remove(self, file_id: str) -> bool:
        """The row first (the file is gone for every replica at once), then its folder."""
        row = self.session.run(lambda conn: conn.execute(
            "DELETE FROM fine_tuning_files WHERE id = %s RETURNING id", (file_id,)).fetchone())
        if row is None:
            return False
        remove_folder(self.root, file_id)
        return True


class JobRows:
    """JobRecords over the `fine_tuning_jobs` table."""

    def __init__(self, session: StateSession) -> None:
        self.session = session

    def create(self, job_dir: Path, record: dict[str, Any], fill: Callable[[Path], None]) -> None:
        write_dir_atomically(job_dir, with_record(record, fill))
        try:
            self.session.run(lambda conn: conn.execute(
                "INSERT INTO fine_tuning_jobs (id, created_ns, record) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (record["id"], queue_order(record)[0], Jsonb(record))))
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise

    def read(self, job_dir: Path) -> dict[str, Any] | None:
        row = self.session.run(lambda conn: conn.execute(
            "SELECT record FROM fine_tuning_jobs WHERE id = %s", (job_dir.name,)).fetchone())
        return dict(row[0]) if row else None

    def update(self, job_dir: Path, changes: dict[str, Any]) -> dict[str, Any] | None:
        def change(conn: psycopg.Connection[Any]) -> dict[str, Any] | None:
            with conn.transaction():
                row = conn.execute("SELECT record FROM fine_tuning_jobs WHERE id = %s FOR UPDATE",
                                   (job_dir.name,)).fetchone()
                if row is None:
                    return None
                record = {**row[0], **changes}
                conn.execute("UPDATE fine_tuning_jobs SET record = %s WHERE id = %s", (Jsonb(record), job_dir.name))
                write_json_atomically(job_dir / JOB_FILE, record)  # the worker's copy, in the row's order
                return record

        return self.session.run(change)

    def all(self, root: Path) -> list[dict[str, Any]]:
        rows = self.session.run(lambda conn: conn.execute(
            "SELECT record FROM fine_tuning_jobs ORDER BY created_ns, id").fetchall())
        return [dict(row[0]) for row in rows]
