"""A server killed with SIGKILL while a job trains loses nothing: on restart the job resumes from its
last checkpoint and finishes, `/v1/models` and the registry agree, and nothing half-made is left.
A worker killed with SIGKILL is restarted from its checkpoint too; pause stops a running job at a
checkpoint and resume continues it; a second job waits in the queue (max_concurrent = 1) through all
of it and runs after.

On the tiny model (fast steps, a fast start-up); the real model's flow is tests/test_fine_tuning.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import openai
import pytest

from lorag.adapters.registry import AdapterRegistry
from tests.conftest import Models, start_server
from tests.devserver import wait_for
from tests.finetune_data import JOB_TIMEOUT_S, chat_lines, upload, wait_job, workers_of, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.engine, pytest.mark.timeout(2400)]
TUNER = "sk-restart-tuner"
CONFIG = """
[fine_tuning]
threads = 1
save_steps = 5
keep_checkpoints = 2
canary_prompts = 2
"""


def said(api: openai.OpenAI, job_id: str, words: str) -> bool:
    """Whether any of the job's events says `words` (the SDK follows every page)."""
    return any(words in event.message for event in api.fine_tuning.jobs.list_events(job_id, limit=100))


def test_kill_9_of_the_server_mid_job_then_restart_resumes_it(models: Models, tmp_path: Path) -> None:
    keys = f'  {{ key = "{TUNER}", name = "tuner", fine_tune = true }},\n'
    server = start_server(models, tmp_path / "one", preload=False, state_dir=tmp_path / "state", extra_config=CONFIG,
                          extra_keys=keys)
    api = openai.OpenAI(base_url=server.api, api_key=TUNER, max_retries=0, timeout=120)
    try:
        job = api.fine_tuning.jobs.create(model="tiny-base", training_file=upload(api, write_jsonl(
            tmp_path / "t.jsonl", chat_lines())), hyperparameters={"n_epochs": 250, "batch_size": 1})
        queued = api.fine_tuning.jobs.create(model="tiny-base", training_file=upload(api, write_jsonl(
            tmp_path / "small.jsonl", chat_lines()[:4])), hyperparameters={"n_epochs": 1})
        wait_for(lambda: said(api, job.id, "Checkpoint created"), JOB_TIMEOUT_S, "a checkpoint", poll_s=0.5)
        assert api.fine_tuning.jobs.retrieve(job.id).status == "running"
        assert api.fine_tuning.jobs.retrieve(queued.id).status == "queued"  # max_concurrent = 1: it waits its turn
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
    finally:
        server.stop()
    wait_for(lambda: not workers_of(job.id), 60, "the worker to die with the server")

    again = start_server(models, tmp_path / "two", preload=False, state_dir=tmp_path / "state", extra_config=CONFIG,
                         extra_keys=keys)
    api = openai.OpenAI(base_url=again.api, api_key=TUNER, max_retries=0, timeout=120)
    try:
        wait_for(lambda: said(api, job.id, "resumed from step"), JOB_TIMEOUT_S,
                 "the job to resume training in a new worker")
        os.kill(workers_of(job.id)[0], signal.SIGKILL)
        wait_for(lambda: said(api, job.id, "exited with code -9"), JOB_TIMEOUT_S, "the runner to see the worker die")
        wait_for(lambda: workers_of(job.id) and api.fine_tuning.jobs.retrieve(job.id).status == "running",
                 JOB_TIMEOUT_S, "a new worker")
        api.fine_tuning.jobs.pause(job.id)
        wait_for(lambda: api.fine_tuning.jobs.retrieve(job.id).status == "paused", JOB_TIMEOUT_S, "the pause")
        assert not workers_of(job.id)
        assert api.fine_tuning.jobs.resume(job.id).status == "queued"
        done = wait_job(api, job.id)
        assert done.status == "succeeded", done.error
        assert wait_job(api, queued.id).status == "succeeded"  # the queue outlived the kill -9 too
        messages = [e.message for e in api.fine_tuning.jobs.list_events(job.id, limit=100)]  # every page
        for words in ("server stopped while it trained", "exited with code -9", "Paused at step"):
            assert any(words in m for m in messages), words
        assert len([m for m in messages if "resumed from step" in m]) >= 2  # after the restart and the pause
        served = {m.id for m in api.models.list() if m.id.startswith("ft:")}
        registered = {v.name for v in AdapterRegistry(tmp_path / "state").all_versions()}
        assert done.fine_tuned_model in served and served == registered
        assert not list((tmp_path / "state").rglob("*.partial")), "a half-written file or directory"
        kept = {Path(v.path) for v in AdapterRegistry(tmp_path / "state").all_versions()}
        on_disk = {p for p in (tmp_path / "state" / "adapters").glob("*/*")
                   if p.is_dir() and not p.parent.name.startswith(".")}  # .null: the engine's own
        assert on_disk == kept, "adapter files the registry does not know (or the reverse)"
    finally:
        again.stop()
    assert not workers_of(job.id)
