"""`lorag serve --workers N`: N processes share one state directory and its fine-tuning queue,
and only the one holding the jobs lock (lorag.state.leader) works it.

Two (or three) FineTuningService instances on one state directory in this process stand for
the workers: each has its own FileLeadership on `<state>/leader-jobs.lock`, and two open()s
of one file conflict under flock even in one process. Real runners, real training workers on
the tiny model, a real job queue on disk; only the engine is the echo engine (nothing is served).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lorag.adapters.registry import AdapterRegistry
from lorag.adapters.service import AdapterService
from lorag.config import Settings
from lorag.finetune.files import FileStore
from lorag.finetune.jobs import JobStore
from lorag.finetune.naming import new_id
from lorag.finetune.runner import JobRunner
from lorag.finetune.service import FineTuningService
from lorag.finetune.settings import FineTuningSettings
from lorag.serving.principal import Principal
from lorag.state.leader import FileLeadership
from tests.conftest import BASE_NAME, MAX_RANK, Models
from tests.echo_engine import EchoEngine
from tests.finetune_data import chat_lines, workers_of, write_jsonl

pytestmark = pytest.mark.timeout(900)
WAIT_S = 120  # generous: the machine may be loaded; nothing here measures time
TUNER = Principal(name="tuner", admin=False, fine_tune=True, key_id="tuner")


def worker_settings(models: Models, state: Path) -> Settings:
    """What each of `lorag serve --workers 2` builds (its fleet is never reached here)."""
    return Settings.model_validate({
        "state_dir": str(state),
        "model": {"path": str(models.base), "name": BASE_NAME},
        "engine": {"backend": "remote", "max_lora_rank": MAX_RANK,
                   "servers": [{"url": "http://127.0.0.1:9", "name": "unused"}]},
        "server": {"workers": 2},
        "fine_tuning": {"threads": 1, "save_steps": 5, "keep_checkpoints": 2, "canary_prompts": 0},
    })


def a_worker(settings: Settings) -> FineTuningService:
    """One worker's fine-tuning service, built as create_app builds it."""
    engine = EchoEngine()
    adapters = AdapterService(settings, AdapterRegistry(settings.state_path), engine)
    files = FileStore(settings.state_path, settings.fine_tuning.max_file_bytes)
    return FineTuningService(settings, files, adapters, engine)


async def until(check: Callable[[], Any], what: str) -> Any:
    """Poll (without blocking the loop the runners live in) until `check()` is truthy."""
    deadline = time.monotonic() + WAIT_S
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)
    return found


def said(service: FineTuningService, job_id: str, words: str) -> int:
    """How many of the job's events say `words`."""
    return sum(words in event["message"] for event in service.store.events(job_id))


async def long_job(service: FineTuningService, tmp_path: Path) -> str:
    """A job that trains far longer than the test: it is stopped, resumed and cancelled, never finished."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_lines() * 8).read_bytes()
    upload = service.files.add_bytes(data, filename="train.jsonl", purpose="fine-tune", owner=TUNER.key_id)
    job = await service.create({"model": BASE_NAME, "training_file": upload["id"],
                                "hyperparameters": {"n_epochs": 256, "batch_size": 1}}, TUNER)
    return str(job["id"])


def test_one_worker_runs_the_queue_another_takes_over_and_a_follower_pauses_and_cancels(
        models: Models, tmp_path: Path) -> None:
    asyncio.run(_leader_and_follower(models, tmp_path))


async def _leader_and_follower(models: Models, tmp_path: Path) -> None:
    settings = worker_settings(models, tmp_path / "state")
    first, second = a_worker(settings), a_worker(settings)
    await first.runner.start()
    await second.runner.start()
    try:
        assert first.runner.leading and not second.runner.leading
        job_id = await long_job(second, tmp_path)  # made through the follower: the leader runs it
        await until(lambda: said(first, job_id, "Checkpoint created"), "the leader's worker to checkpoint")
        assert list(first.runner.workers) == [job_id] and not second.runner.workers
        assert len(workers_of(job_id)) == 1
        await _a_follower_starting_leaves_the_job_alone(settings, first, job_id)

        await first.runner.stop()  # the leader goes: its worker checkpoints, the job waits, the lock is free
        await until(lambda: said(second, job_id, "resumed from step"), "the new leader to resume the job")
        assert second.runner.leading and list(second.runner.workers) == [job_id]
        assert len(workers_of(job_id)) == 1 and second.store.get(job_id)["crashes"] == 0

        await first.runner.start()  # back, as a follower
        assert not first.runner.leading
        await _pause_through_the_follower(first, second, job_id)
        await _cancel_through_the_follower(first, second, job_id)
    finally:
        await asyncio.gather(first.runner.stop(), second.runner.stop())
    assert not workers_of(job_id)


async def _a_follower_starting_leaves_the_job_alone(settings: Settings, leader: FineTuningService,
                                                   job_id: str) -> None:
    """A worker starting beside a leader must not recover (kill and requeue) the leader's running job."""
    pid = leader.store.get(job_id)["worker_pid"]
    late = a_worker(settings)
    await late.runner.start()
    try:
        assert not late.runner.leading
        record = late.store.get(job_id)
        assert (record["status"], record["worker_pid"], record["crashes"]) == ("running", pid, 0)
        assert workers_of(job_id) == [pid]
    finally:
        await late.runner.stop()


async def _pause_through_the_follower(follower: FineTuningService, leader: FineTuningService, job_id: str) -> None:
    before = said(leader, job_id, "Fine-tuning job paused.")
    assert (await follower.pause(job_id, TUNER))["status"] == "running"  # it stops at its next step
    await until(lambda: follower.store.get(job_id)["status"] == "paused", "the pause to reach the worker")
    await until(lambda: job_id not in leader.runner.workers, "the leader to see its worker end")
    record = follower.store.get(job_id)
    assert (record["status"], record["crashes"], record["worker_pid"]) == ("paused", 0, None)
    assert said(leader, job_id, "Fine-tuning job paused.") == before + 1 and not said(leader, job_id, "interrupted")
    assert not workers_of(job_id)

    resumed = said(leader, job_id, "resumed from step")
    assert (await follower.resume(job_id, TUNER))["status"] == "queued"
    await until(lambda: said(leader, job_id, "resumed from step") > resumed, "the leader to resume the job")
    record = follower.store.get(job_id)
    assert record["status"] == "running" and record.get("stop_requested") is None  # a new run, nothing asked of it
    assert list(leader.runner.workers) == [job_id] and not follower.runner.workers


async def _cancel_through_the_follower(follower: FineTuningService, leader: FineTuningService, job_id: str) -> None:
    assert (await follower.cancel(job_id, TUNER))["status"] == "cancelled"
    await until(lambda: job_id not in leader.runner.workers, "the cancel to reach the worker")
    assert not workers_of(job_id)
    record = follower.store.get(job_id)
    assert (record["status"], record["crashes"]) == ("cancelled", 0)  # not taken for a crash, not requeued
    assert not said(leader, job_id, "interrupted")


def test_a_follower_never_signals_a_pid_that_is_not_the_jobs_worker(tmp_path: Path) -> None:
    """The pid on a record may belong to anything by now: a follower checks it is the job's worker."""
    store = JobStore(tmp_path / "state")
    leader = FileLeadership(tmp_path / "state" / "leader-jobs.lock")
    assert leader.try_hold()
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        job_id = new_id("ftjob")
        store.create({"id": job_id, "created_at": int(time.time()), "status": "running",
                      "worker_pid": stranger.pid}, lambda staging: None)
        runner = JobRunner(settings=FineTuningSettings(threads=1), store=store, validate=_nothing, finish=_nothing,
                           fail=_no_failure, leadership=FileLeadership(leader.path))
        assert runner.signal(job_id, "cancel") is False
        assert stranger.poll() is None  # untouched
        assert store.get(job_id)["stop_requested"] == "cancel"  # the leader still learns what was asked
    finally:
        stranger.kill()
        stranger.wait()
        leader.release()


async def _nothing(record: dict[str, Any]) -> None:
    raise AssertionError("a runner that only signals calls no hook")


async def _no_failure(job_id: str, error: dict[str, Any]) -> None:
    raise AssertionError("a runner that only signals fails no job")
