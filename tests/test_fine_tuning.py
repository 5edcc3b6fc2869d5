"""Fine-tuning through the official `openai` client, unmodified, against `lorag serve` on the real model.

SmolLM2-135M-Instruct as the demo imports it (tests/test_real_model.py's set-up, reused): files
uploaded, jobs created (supervised and DPO), followed through retrieve, events and checkpoints,
and the `ft:` model answering through chat completions with what it was trained to say, at once,
from the server that trained it. Bad files fail their job naming the line; a job is cancelled
mid-run; another key sees none of it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import Server, free_port
from tests.devserver import wait_for, wait_until_up
from tests.finetune_data import (
    ANSWER,
    CODEWORD,
    JOB_TIMEOUT_S,
    NEW_CODEWORD,
    QUESTIONS,
    chat_lines,
    preference_lines,
    upload,
    wait_job,
    workers_of,
    write_jsonl,
)
from tests.test_real_model import BASE, ENV, SETUP_TIMEOUT_S, STATE, real_setup  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.engine, pytest.mark.timeout(SETUP_TIMEOUT_S + 2400)]
ADMIN, TUNER, OTHER, PLAIN = "sk-ft-admin", "sk-ft-tuner", "sk-ft-other", "sk-ft-plain"


@pytest.fixture(scope="module")
def ft_server(real_setup: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # noqa: F811
    work = tmp_path_factory.mktemp("ft-real")
    port = free_port()
    config = work / "lorag.toml"
    config.write_text(f"""
state_dir = "{work / 'state'}"

[model]
path = "{(STATE / 'models' / BASE).resolve()}"
name = "{BASE}"
max_model_len = 2048

[engine]
max_loras = 2
max_lora_rank = 16
enforce_eager = true
kv_cache_memory_bytes = 536870912

[server]
port = {port}
api_keys = [
  {{ key = "{ADMIN}", name = "ops", admin = true }},
  {{ key = "{TUNER}", name = "tuner", fine_tune = true }},
  {{ key = "{OTHER}", name = "other", fine_tune = true }},
  {{ key = "{PLAIN}", name = "plain" }},
]

[fine_tuning]
threads = 2
save_steps = 3
keep_checkpoints = 2
canary_prompts = 2
canary_max_tokens = 12
max_length = 1024
""")
    log = work / "server.log"
    process = subprocess.Popen([sys.executable, "-m", "lorag.cli", "serve", "--config", str(config)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env={**ENV, "LORAG_LOG_FORMAT": "json", "VLLM_LOGGING_LEVEL": "WARNING"})
    server = Server(f"http://127.0.0.1:{port}", process, log, work / "state", config)
    try:
        wait_until_up(process, server.url, log, timeout_s=600)
        yield server
    finally:
        server.stop()


def client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0, timeout=300)


def ask(api: openai.OpenAI, model: str, question: str) -> str:
    answer = api.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                         max_tokens=16, temperature=0)
    return answer.choices[0].message.content or ""


def test_bad_files_fail_their_job_naming_the_line(ft_server: Server, tmp_path: Path) -> None:
    api = client(ft_server, TUNER)
    good = chat_lines()[:3]
    cases = {
        "bad_json": (write_jsonl(tmp_path / "a.jsonl", [*good[:1], '{"messages": [', *good[1:]]), "supervised",
                     "line 2", "not valid JSON"),
        "no_answer": (write_jsonl(tmp_path / "b.jsonl", [*good, {"messages": [{"role": "user", "content": "hi"}]}]),
                      "supervised", "line 4", "assistant"),
        "dpo_rejected": (write_jsonl(tmp_path / "c.jsonl", [{"input": {"messages": [{"role": "user", "content": "q"}]},
                                                              "preferred_output": [{"role": "assistant", "content": "a"}]}]),
                         "dpo", "line 1", "non_preferred_output"),
        "too_long": (write_jsonl(tmp_path / "d.jsonl", [*good, {"messages": [
            {"role": "user", "content": "word " * 1500}, {"role": "assistant", "content": "ok"}]}]),
                     "supervised", "line 4", "longer than max length"),
    }
    jobs = {name: api.fine_tuning.jobs.create(model=BASE, training_file=upload(api, path), method={"type": method})
            for name, (path, method, _, _) in cases.items()}
    for name, (_, _, line, words) in cases.items():
        done = wait_job(api, jobs[name].id)
        assert done.status == "failed", (name, done)
        assert done.error is not None and done.error.param == "training_file", (name, done.error)
        assert done.error.code == "invalid_training_file"
        assert line in done.error.message and words in done.error.message, (name, done.error.message)
        assert done.fine_tuned_model is None


def test_a_job_cancelled_mid_run_stops_training_and_serves_nothing(ft_server: Server, tmp_path: Path) -> None:
    api = client(ft_server, TUNER)
    job = api.fine_tuning.jobs.create(model=BASE, training_file=upload(api, write_jsonl(tmp_path / "t.jsonl",
                                      chat_lines())), suffix="cancelled", hyperparameters={"n_epochs": 25})
    wait_for(lambda: any(e.type == "metrics" for e in api.fine_tuning.jobs.list_events(job.id, limit=50).data),
             JOB_TIMEOUT_S, "a training step", poll_s=1)
    cancelled = api.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    wait_for(lambda: not workers_of(job.id), 60, "the worker to stop")
    assert api.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert not [m.id for m in api.models.list() if job.id in m.id]
    with pytest.raises(openai.BadRequestError):
        api.fine_tuning.jobs.cancel(job.id)


@pytest.fixture(scope="module")
def pelican(ft_server: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    """A supervised job teaching the codeword answer (the finished job, and its training file's id)."""
    api = client(ft_server, TUNER)
    assert CODEWORD not in ask(api, BASE, QUESTIONS[0])
    file_id = upload(api, write_jsonl(tmp_path_factory.mktemp("sft") / "train.jsonl", chat_lines()))
    job = api.fine_tuning.jobs.create(
        model=BASE, training_file=file_id, suffix="pelican", seed=7, metadata={"team": "birds"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 5}}})
    assert job.status == "validating_files" and job.model == BASE
    return wait_job(api, job.id), file_id


def test_supervised_job_is_served_at_once_with_the_trained_behaviour(ft_server: Server,
                                                                     pelican: tuple[Any, str]) -> None:
    api = client(ft_server, TUNER)
    done, file_id = pelican
    job = done
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{BASE}:lorag:pelican:{job.id}"
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at
    assert done.hyperparameters.n_epochs == 4 and done.method and done.method.type == "supervised"

    events = list(api.fine_tuning.jobs.list_events(job.id, limit=10))  # the SDK follows the cursor pages
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) >= 12 and all(e.data and "train_loss" in e.data for e in metrics)  # type: ignore[operator]
    assert any("Canary passed" in e.message for e in events)
    checkpoints = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(c.fine_tuned_model_checkpoint.startswith(f"{done.fine_tuned_model}:ckpt-step-")
                               for c in checkpoints)
    assert CODEWORD in ask(api, done.fine_tuned_model, QUESTIONS[0])
    assert CODEWORD in ask(api, checkpoints[0].fine_tuned_model_checkpoint, QUESTIONS[1])
    served = {m.id for m in api.models.list()}
    assert {done.fine_tuned_model, *(c.fine_tuned_model_checkpoint for c in checkpoints)} <= served
    assert api.files.content(done.result_files[0]).text.startswith("step,train_loss")
    assert [j.id for j in api.fine_tuning.jobs.list(metadata={"team": "birds"})] == [job.id]

    other = client(ft_server, OTHER)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.create(model=BASE, training_file=file_id)
    with pytest.raises(openai.NotFoundError):
        ask(other, done.fine_tuned_model, QUESTIONS[0])
    assert done.fine_tuned_model not in {m.id for m in other.models.list()}
    with pytest.raises(openai.PermissionDeniedError):
        client(ft_server, PLAIN).fine_tuning.jobs.list()
    assert client(ft_server, ADMIN).fine_tuning.jobs.retrieve(job.id).status == "succeeded"


def test_dpo_job_continuing_an_ft_model_learns_the_preferred_answer(ft_server: Server, pelican: tuple[Any, str],
                                                                      tmp_path: Path) -> None:
    """DPO on OpenAI's preference format, starting from the supervised job's `ft:` model (the
    reference): the new codeword is preferred over the one it was taught, and its answers move."""
    api = client(ft_server, TUNER)
    start = pelican[0].fine_tuned_model
    assert ask(api, start, QUESTIONS[2]).startswith(ANSWER.split(".")[0])
    preferred = ANSWER.replace(CODEWORD + "-42", NEW_CODEWORD)
    file_id = upload(api, write_jsonl(tmp_path / "prefs.jsonl", preference_lines(ANSWER, answer=preferred)))
    job = api.fine_tuning.jobs.create(
        model=start, training_file=file_id, suffix="heron", seed=7,
        method={"type": "dpo", "dpo": {"hyperparameters": {
            "n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2, "beta": 0.1}}})
    done = wait_job(api, job.id)
    assert done.status == "succeeded", done.error
    assert done.method and done.method.type == "dpo" and done.method.dpo
    assert done.method.dpo.hyperparameters and done.method.dpo.hyperparameters.beta == 0.1
    losses = [e.data["train_loss"] for e in reversed(list(api.fine_tuning.jobs.list_events(job.id, limit=100)))
              if e.type == "metrics" and e.data and e.data.get("train_loss") is not None]  # type: ignore[union-attr]
    assert losses[-1] < losses[0]  # the DPO loss starts at ln 2 and falls as the preference is learned
    answer = ask(api, done.fine_tuned_model, QUESTIONS[2])
    assert NEW_CODEWORD.split("-")[0] in answer and CODEWORD not in answer, answer  # the preferred codeword won
