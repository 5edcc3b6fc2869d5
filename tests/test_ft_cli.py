"""`lorag ft` against a real lorag server over HTTP (the echo server: tests/echo_server.py).

No job trains here (`[fine_tuning] max_concurrent = 0`: jobs are validated, then stay queued),
so the CLI is tested on what the API does without a worker: uploads, validation failures
naming the line, listing, showing, cancel, pause and resume, and its errors. Progress lines
and the success path are driven by writing a worker's events into the job's store, as a
worker would. A full training run is tested elsewhere (test_training.py).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner, Result

from lorag.cli import cli, main
from lorag.errors import LoragError
from lorag.finetune.cli import FineTuningApi, Unreachable, event_line, follow, one_line
from lorag.finetune.jobs import JobStore, add_event
from tests.echo_server import (
    OTHER_TRAINER,
    TRAINER,
    USER_KEY,
    EchoServer,
    echo_server,
    echo_settings,
    trainer_keys,
)

pytestmark = pytest.mark.timeout(300)
GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
BAD_LINE = '{"messages": "not a list"}\n'


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    settings = echo_settings(tmp_path_factory.mktemp("ft-cli"), server={"api_keys": trainer_keys()},
                             fine_tuning={"max_concurrent": 0})
    with echo_server(settings) as server:
        yield server


@pytest.fixture(autouse=True)
def logs_to_stderr() -> None:
    """As `lorag` itself does (lorag.cli.main): the server's events on stderr, stdout for results."""
    from lorag.logging import configure_logging

    configure_logging()


def ft(echo: EchoServer, *args: str, key: str = TRAINER) -> Result:
    """`lorag ft --server URL --api-key KEY ARGS` in process; a LoragError stays in result.exception."""
    return CliRunner().invoke(cli, ["ft", "--server", echo.url, "--api-key", key, *args])


def lorag(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`lorag ARGS` through the console entry point, as a person runs it: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lorag", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    ours = [line for line in err.splitlines(keepends=True) if not line.startswith("{")]  # not the server's log
    return code, out, "".join(ours)


def failed_with(result: Result, *parts: str) -> str:
    """The one-line LoragError the command ended with (lorag prints it as `error: ...`, exit 1)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, LoragError), repr(result.exception)
    message = str(result.exception)
    assert "\n" not in message and all(part in message for part in parts), message
    return message


def data_file(tmp_path: Path, text: str, name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def create(echo: EchoServer, tmp_path: Path, *extra: str, text: str = GOOD * 3) -> str:
    result = ft(echo, "create", "--model", "echo-base", "--training-file", str(data_file(tmp_path, text)), *extra)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert job_id.startswith("ftjob-") and "uploaded" in result.stderr
    return job_id


def wait_for_status(echo: EchoServer, job_id: str, status: str) -> None:
    """The runner validates a new job within a tick (about a second)."""
    store: JobStore = echo.app.state.fine_tuning.store
    deadline = time.monotonic() + 30
    while store.get(job_id)["status"] != status:
        assert time.monotonic() < deadline, store.get(job_id)["status"]
        time.sleep(0.05)


def test_upload_prints_the_file_id_and_size(echo: EchoServer, tmp_path: Path) -> None:
    path = data_file(tmp_path, GOOD * 2)
    result = ft(echo, "upload", str(path))
    assert result.exit_code == 0, result.output
    file_id, size, _, name = result.stdout.split()
    assert file_id.startswith("file-") and int(size) == path.stat().st_size and name == "train.jsonl"
    stored = echo.client(TRAINER).files.retrieve(file_id)
    assert (stored.purpose, stored.bytes) == ("fine-tune", path.stat().st_size)


def test_a_bad_line_fails_the_job_and_every_command_names_it(echo: EchoServer, tmp_path: Path) -> None:
    result = ft(echo, "create", "--model", "echo-base", "--training-file",
                str(data_file(tmp_path, GOOD + BAD_LINE)), "--wait", "--interval", "0.1")
    message = failed_with(result, "failed", "line 2")
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("ftjob-") and job_id in message
    assert "Created fine-tuning job" in result.stdout and "Validating training file" in result.stdout

    followed = ft(echo, "events", job_id, "--follow", "--interval", "0.1")
    assert failed_with(followed, "line 2") == message
    lines = followed.stdout.splitlines()
    assert "Created fine-tuning job" in lines[0] and "[error] Fine-tuning job failed" in lines[-1]
    assert "line 2" in lines[-1]  # the multi-line message, on one line

    shown = ft(echo, "show", job_id)
    assert shown.exit_code == 0, shown.output
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert fields["status"] == "failed" and fields["id"] == job_id and fields["fine_tuned_model"] == "-"
    assert fields["error"].startswith("invalid_training_file (training_file): The training file file-")
    assert "line 2" in fields["error"]


def test_create_takes_a_file_id_and_hyperparameters(echo: EchoServer, tmp_path: Path) -> None:
    file_id = ft(echo, "upload", str(data_file(tmp_path, GOOD * 3))).stdout.split()[0]
    result = ft(echo, "create", "--model", "echo-base", "--training-file", file_id, "--epochs", "2",
                "--batch-size", "1", "--lr-multiplier", "0.5", "--suffix", "cli", "--seed", "7",
                "--metadata", "team=docs")
    assert result.exit_code == 0 and "uploaded" not in result.stderr, result.output
    job = echo.client(TRAINER).fine_tuning.jobs.retrieve(result.stdout.strip())
    assert (job.training_file, job.seed, job.suffix, job.metadata) == (file_id, 7, "cli", {"team": "docs"})
    assert job.method.type == "supervised"
    hyper = job.method.supervised.hyperparameters
    assert (hyper.n_epochs, hyper.batch_size, hyper.learning_rate_multiplier) == (2, 1, 0.5)


def test_list_newest_first_with_limit_and_metadata(echo: EchoServer, tmp_path: Path) -> None:
    first = create(echo, tmp_path, "--metadata", "run=list-a")
    time.sleep(1.1)  # jobs are ordered by created_at, in whole seconds: two in one second come in either order
    second = create(echo, tmp_path, "--metadata", "run=list-b")
    result = ft(echo, "list")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "MODEL", "FINE_TUNED_MODEL", "CREATED"]
    ids = [row.split()[0] for row in rows]
    assert ids.index(second) < ids.index(first)
    assert all(row.split()[2] == "echo-base" for row in rows)
    assert ft(echo, "list", "--limit", "1").stdout.splitlines()[1].split()[0] == second
    only = ft(echo, "list", "--metadata", "run=list-a").stdout.splitlines()
    assert [row.split()[0] for row in only[1:]] == [first]
    assert ft(echo, "list", "--metadata", "run=none").stdout.strip() == "no fine-tuning jobs"
    assert ft(echo, "list", key=OTHER_TRAINER).stdout.strip() == "no fine-tuning jobs"  # a key sees its own


def test_cancel_a_queued_job(echo: EchoServer, tmp_path: Path) -> None:
    job_id = create(echo, tmp_path)
    wait_for_status(echo, job_id, "queued")
    result = ft(echo, "cancel", job_id)
    assert (result.exit_code, result.stdout.strip()) == (0, f"{job_id}: cancelled")
    failed_with(ft(echo, "cancel", job_id), "already cancelled")
    followed = ft(echo, "events", job_id, "-f", "--interval", "0.1")
    failed_with(followed, job_id, "was cancelled")
    assert "Fine-tuning job cancelled." in followed.stdout.splitlines()[-1]
    assert ft(echo, "checkpoints", job_id).stdout.strip() == "no checkpoints"


def test_pause_and_resume_a_queued_job(echo: EchoServer, tmp_path: Path) -> None:
    job_id = create(echo, tmp_path)
    wait_for_status(echo, job_id, "queued")
    assert ft(echo, "pause", job_id).stdout.strip() == f"{job_id}: paused"
    assert "paused" in [line.split()[1] for line in ft(echo, "show", job_id).stdout.splitlines() if line.startswith("status")]
    assert ft(echo, "resume", job_id).stdout.strip() == f"{job_id}: queued"
    failed_with(ft(echo, "resume", job_id), "not paused")
    messages = ft(echo, "events", job_id).stdout
    assert messages.index("paused") < messages.index("resumed")


def test_follow_prints_progress_lines_and_the_model(echo: EchoServer, tmp_path: Path) -> None:
    """A worker's events and outcome, written into the job while `events --follow` polls."""
    job_id = create(echo, tmp_path)
    wait_for_status(echo, job_id, "queued")
    store: JobStore = echo.app.state.fine_tuning.store
    model = f"ft:echo-base:lorag::{job_id}"

    def worker() -> None:
        time.sleep(0.3)
        store.update(job_id, status="running", estimated_finish=int(time.time()) + 60)
        for step in (1, 2):
            add_event(store.dir_of(job_id), f"Step {step}/2", kind="metrics",
                      data={"step": step, "total_steps": 2, "train_loss": 1.0 / step, "train_mean_token_accuracy": 0.5})
            time.sleep(0.3)
        add_event(store.dir_of(job_id), f"New fine-tuned model created: {model}")
        store.update(job_id, status="succeeded", fine_tuned_model=model, finished_at=int(time.time()))

    thread = threading.Thread(target=worker)
    thread.start()
    result = ft(echo, "events", job_id, "--follow", "--interval", "0.1")
    thread.join()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    steps = [line.split("  ", 1)[1] for line in lines if "step " in line]
    assert steps[0].startswith("step 1/2  loss 1.0000  acc 0.500  eta ")
    assert steps[1].startswith("step 2/2  loss 0.5000  acc 0.500")
    assert lines[-1] == f"fine-tuned model: {model}"
    assert len(lines) == len(set(lines))  # each event once


def test_unknown_job_and_refused_key_are_one_line(echo: EchoServer) -> None:
    for command in ("show", "events", "checkpoints", "cancel", "pause", "resume"):
        failed_with(ft(echo, command, "ftjob-nosuchjob"), "No fine-tuning job 'ftjob-nosuchjob'")
    failed_with(ft(echo, "show", "../../v1/models"), "Not Found")  # quoted: not another route
    failed_with(ft(echo, "list", key=USER_KEY), "fine_tune")
    failed_with(ft(echo, "create", "--model", "no-such-model", "--training-file", "file-missing"), "file-missing")


def test_usage_errors_exit_2(echo: EchoServer, tmp_path: Path) -> None:
    path = str(data_file(tmp_path, GOOD))
    beta = ft(echo, "create", "--model", "echo-base", "--training-file", path, "--beta", "0.2")
    assert beta.exit_code == 2 and "--method dpo" in beta.output
    metadata = ft(echo, "create", "--model", "echo-base", "--training-file", path, "--metadata", "novalue")
    assert metadata.exit_code == 2 and "KEY=VALUE" in metadata.output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_errors_print_one_line_through_the_entry_point(echo: EchoServer, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.delenv("LORAG_SERVER", raising=False)
    monkeypatch.delenv("LORAG_API_KEY", raising=False)
    code, _, err = lorag(monkeypatch, capsys, "ft", "--server", f"http://127.0.0.1:{free_port()}", "list")
    assert code == 1 and err.startswith("error: cannot reach the server at http://127.0.0.1:")
    assert err.count("\n") == 1 and "Traceback" not in err

    monkeypatch.setenv("LORAG_SERVER", echo.url)
    monkeypatch.setenv("LORAG_API_KEY", TRAINER)
    code, _, err = lorag(monkeypatch, capsys, "ft", "show", "ftjob-nosuchjob")
    assert (code, err) == (1, "error: No fine-tuning job 'ftjob-nosuchjob'.\n")

    job_id = create(echo, tmp_path, text=GOOD + BAD_LINE)
    code, out, err = lorag(monkeypatch, capsys, "ft", "events", job_id, "--follow", "--interval", "0.1")
    assert code == 1 and err.startswith(f"error: Fine-tuning job {job_id} failed: The training file file-")
    assert "line 2" in err and err.count("\n") == 1 and "Validating training file" in out

    monkeypatch.chdir(tmp_path)  # a lorag.toml whose address nothing answers at, and no --server
    (tmp_path / "lorag.toml").write_text(f"[server]\nport = {free_port()}\n")
    monkeypatch.delenv("LORAG_SERVER")
    monkeypatch.delenv("LORAG_CONFIG", raising=False)
    code, _, err = lorag(monkeypatch, capsys, "ft", "list")
    assert code == 1 and err.startswith("error: No lorag server answers at ") and err.count("\n") == 1


def test_lines_are_readable() -> None:
    assert one_line("f.jsonl: 2 problems in the data:\n  line 2: bad\n  line 3: worse") == \
        "f.jsonl: 2 problems in the data: line 2: bad; line 3: worse"
    event = {"type": "metrics", "created_at": 0, "level": "info", "message": "Step 12/40",
             "data": {"step": 12, "total_steps": 40, "train_loss": 0.81234, "train_mean_token_accuracy": 0.7421,
                      "valid_loss": None}}
    assert event_line(event).split("  ", 1)[1] == "step 12/40  loss 0.8123  acc 0.742"
    running = {"status": "running", "estimated_finish": time.time() + 60}
    assert " eta " in event_line(event, running)
    warned = {"type": "message", "created_at": 0, "level": "warn", "message": "interrupted\nresumes"}
    assert event_line(warned).endswith("  [warn] interrupted; resumes")


class FlakyApi:
    """A server that goes away for `lost` polls (a restart), then reports the job succeeded."""

    def __init__(self, lost: int) -> None:
        self.lost = lost

    def job(self, job_id: str) -> dict[str, Any]:
        if self.lost:
            self.lost -= 1
            raise Unreachable("cannot reach the server at http://x: connection refused")
        return {"id": job_id, "status": "succeeded", "fine_tuned_model": "ft:m:lorag::j"}

    def new_events(self, job_id: str, seen: set[str]) -> list[dict[str, Any]]:
        return []


def test_follow_waits_for_a_restarting_server(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    follow(cast(FineTuningApi, FlakyApi(lost=3)), "ftjob-x", 0.01)
    out, err = capsys.readouterr()
    assert out == "fine-tuned model: ft:m:lorag::j\n"
    assert err.count("retrying for 60 s") == 1  # said once, not once a poll
    monkeypatch.setattr("lorag.finetune.cli.RETRY_S", 0.05)
    with pytest.raises(Unreachable, match="cannot reach the server"):
        follow(cast(FineTuningApi, FlakyApi(lost=1000)), "ftjob-x", 0.01)


def test_a_dead_server_is_unreachable_not_an_error_answer(echo: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAG_SERVER", echo.url)  # a command's own --server wins over the environment
    dead = CliRunner().invoke(cli, ["ft", "show", "ftjob-x", "--server", f"http://127.0.0.1:{free_port()}"])
    assert isinstance(dead.exception, Unreachable)
    answered = ft(echo, "show", "ftjob-x")
    assert isinstance(answered.exception, LoragError) and not isinstance(answered.exception, Unreachable)
