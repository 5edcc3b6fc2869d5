"""Fine-tuning files and jobs shared by lorag replicas through a real PostgreSQL server.

Two real lorag apps (the echo engine; nothing is served from the trained adapter) on one database
and one shared directory: a file uploaded through one is listed, read and deleted through the
other; a job made through one is run by exactly one runner among them (the jobs leadership is
the database's), read with its events through the other, and cancelled through the replica that
does not run it. Record changes are atomic across processes on both backends.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from lorag.config import Settings
from lorag.finetune.jobs import JobStore
from lorag.finetune.naming import new_id
from lorag.finetune.stores import open_job_store
from tests.conftest import BASE_NAME, Models
from tests.echo_server import TRAINER, EchoServer, echo_server, echo_settings, trainer_keys
from tests.finetune_data import chat_lines, workers_of, write_jsonl
from tests.postgres_server import PostgresServer

pytestmark = pytest.mark.timeout(600)
WAIT_S = 120  # generous: the machine may be loaded; nothing here measures time


def shared_settings(tmp_path: Path, name: str, url: str, models: Models | None = None) -> Settings:
    """One replica: its own state directory, the shared database and directory."""
    model = {"model": {"path": str(models.base), "name": BASE_NAME}} if models else {}
    return echo_settings(tmp_path / name, state={"backend": "postgres", "url": url, "shared_dir": str(tmp_path / "shared")},
                         server={"api_keys": trainer_keys()}, **model,
                         fine_tuning={"threads": 1, "save_steps": 5, "keep_checkpoints": 2, "canary_prompts": 0})


@contextlib.contextmanager
def two_replicas(tmp_path: Path, url: str, models: Models | None = None) -> Iterator[tuple[EchoServer, EchoServer]]:
    with echo_server(shared_settings(tmp_path, "a", url, models)) as a, \
            echo_server(shared_settings(tmp_path, "b", url, models)) as b:
        yield a, b


def until(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return found


def test_a_file_uploaded_through_one_replica_is_listed_read_and_deleted_through_another(
        postgres: PostgresServer, tmp_path: Path) -> None:
    with two_replicas(tmp_path, postgres.database("shared_files")) as (a, b):
        data = write_jsonl(tmp_path / "train.jsonl", chat_lines()).read_bytes()
        uploaded = a.client(TRAINER).files.create(file=("train.jsonl", data), purpose="fine-tune")
        api = b.client(TRAINER)
        assert [f.id for f in api.files.list()] == [uploaded.id]
        assert api.files.retrieve(uploaded.id).bytes == len(data)
        assert api.files.content(uploaded.id).read() == data
        assert (tmp_path / "shared" / "fine_tuning" / "files" / uploaded.id / "content").read_bytes() == data
        assert not (tmp_path / "a" / "state" / "files").exists()  # nothing of it in a replica's own state

        assert api.files.delete(uploaded.id).deleted
        assert [f.id for f in a.client(TRAINER).files.list()] == []
        with pytest.raises(openai.NotFoundError):
            a.client(TRAINER).files.retrieve(uploaded.id)
        assert not (tmp_path / "shared" / "fine_tuning" / "files" / uploaded.id).exists()


@pytest.mark.parametrize("hosts", ["one host", "two hosts"])
def test_a_job_made_through_one_replica_runs_once_and_is_cancelled_through_the_other(
        postgres: PostgresServer, models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hosts: str) -> None:
    """On one host the replica that does not run the job signals its worker itself; on two, the
    worker's pid means nothing there, and the leader stops it when it reads the request."""
    if hosts == "two hosts":
        import lorag.finetune.runner

        monkeypatch.setattr(lorag.finetune.runner, "_signal_worker", lambda *_: False)  # another host's pid
    with two_replicas(tmp_path, postgres.database(f"shared_jobs_{hosts.split()[0]}"), models) as (a, b):
        data = write_jsonl(tmp_path / "train.jsonl", chat_lines() * 8).read_bytes()
        training = a.client(TRAINER).files.create(file=("train.jsonl", data), purpose="fine-tune")
        job = b.client(TRAINER).fine_tuning.jobs.create(  # trains far longer than the test: it is cancelled
            model=BASE_NAME, training_file=training.id, hyperparameters={"n_epochs": 256, "batch_size": 1})

        def runner_of() -> list[EchoServer]:
            return [r for r in (a, b) if job.id in r.app.state.fine_tuning.runner.workers]

        [running] = until(runner_of, "a replica to start the job's worker")
        other = b if running is a else a
        assert [r.app.state.fine_tuning.runner.leading for r in (running, other)] == [True, False]
        assert len(workers_of(job.id)) == 1

        api = a.client(TRAINER)
        until(lambda: any("Checkpoint created" in e.message for e in api.fine_tuning.jobs.list_events(job.id)),
              "the worker's first checkpoint, seen through A")
        assert [j.id for j in api.fine_tuning.jobs.list()] == [job.id]
        assert api.fine_tuning.jobs.retrieve(job.id).status == "running"

        assert other.client(TRAINER).fine_tuning.jobs.cancel(job.id).status == "cancelled"
        until(lambda: job.id not in running.app.state.fine_tuning.runner.workers, "the cancel to reach the worker")
        assert not workers_of(job.id) and not runner_of()
        time.sleep(2 * 1.0)  # two runner ticks: a requeued job would be started again by now
        record = running.app.state.fine_tuning.store.get(job.id)
        assert (record["status"], record["crashes"]) == ("cancelled", 0)
        assert api.fine_tuning.jobs.retrieve(job.id).status == "cancelled" and not runner_of()
        messages = [e.message for e in b.client(TRAINER).fine_tuning.jobs.list_events(job.id)]
        assert "Fine-tuning job cancelled." in messages and not [m for m in messages if "interrupted" in m]


# -- record changes: atomic across processes --------------------------------------------------------

UPDATES = 40


def _set_many(store_of: Callable[[], JobStore], job_id: str, prefix: str) -> None:
    """In a process of its own: fields `prefix0..N`, one update each."""
    store = store_of()
    for n in range(UPDATES):
        store.update(job_id, **{f"{prefix}{n}": n})


@pytest.fixture(params=["files", "postgres"])
def job_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], JobStore]:
    if request.param == "files":
        return lambda: JobStore(tmp_path / "state")
    url = request.getfixturevalue("postgres").database(f"atomic_{secrets.token_hex(4)}")
    settings = Settings.model_validate({"state_dir": str(tmp_path / "state"),
                                        "state": {"backend": "postgres", "url": url, "shared_dir": str(tmp_path)}})
    return lambda: open_job_store(settings)


def test_changes_from_two_processes_are_never_lost(job_store: Callable[[], JobStore]) -> None:
    store = job_store()
    job_id = new_id("ftjob")
    store.create({"id": job_id, "created_at": int(time.time()), "status": "running"}, lambda staging: None)
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_set_many, args=(job_store, job_id, prefix)) for prefix in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(WAIT_S)
    assert [w.exitcode for w in writers] == [0, 0]
    record = job_store().get(job_id)
    assert all(record.get(f"{p}{n}") == n for p in ("a", "b") for n in range(UPDATES))
    assert record["status"] == "running"
