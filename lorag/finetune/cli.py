"""`lorag ft`: upload files and run fine-tuning jobs on a running lorag server, over its OpenAI API.

Training happens in the server (its runner and workers), so every command here is an HTTP
client of `/v1/files` and `/v1/fine_tuning/jobs`, found and authenticated the way `lorag
adapters` finds a server (--server, $LORAG_SERVER, or the configured host:port if it answers;
--api-key or $LORAG_API_KEY, a key with the fine_tune scope). Errors are LoragErrors of one
line, which `lorag` prints as `error: ...` with a non-zero exit code.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import click

from lorag.cli_options import config_options
from lorag.errors import LoragError
from lorag.finetune.cli_client import (
    FineTuningApi,
    Unreachable,
    job_path,
    one_line,
    pairs,
    pass_api,
    server_options,
    table,
)

FINISHED = ("succeeded", "failed", "cancelled")
RETRY_S = 60.0  # a follower waits this long for a server that went away (a restart) before giving up


def when(timestamp: float | None, *, clock: bool = False) -> str:
    """Local time; `clock`: only the time of day when it is today."""
    if not timestamp:
        return "-"
    moment = time.localtime(timestamp)
    if clock and time.strftime("%Y-%m-%d", moment) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", moment)
    return time.strftime("%Y-%m-%d %H:%M:%S", moment)


def event_line(event: dict[str, Any], job: dict[str, Any] | None = None) -> str:
    """One line per event: a progress line for a metrics event (with the job's eta if given), else the message."""
    data = event.get("data") or {}
    text = one_line(str(event.get("message", "")))
    if event.get("type") == "metrics" and "step" in data:
        text = f"step {data['step']}/{data.get('total_steps', '?')}"
        for label, key, digits in (("loss", "train_loss", 4), ("acc", "train_mean_token_accuracy", 3),
                                   ("valid_loss", "valid_loss", 4)):
            if data.get(key) is not None:
                text += f"  {label} {data[key]:.{digits}f}"
        if job and job.get("status") == "running" and job.get("estimated_finish"):
            text += f"  eta {when(job['estimated_finish'], clock=True)}"
    level = event.get("level", "info")
    mark = "" if level == "info" else f"[{level}] "
    return f"{when(event.get('created_at'), clock=True)}  {mark}{text}"


def job_fields(job: dict[str, Any]) -> list[tuple[str, str]]:
    """What `show` prints, in the order a person reads a job (hyperparameters: the method's, beta included)."""
    error, method = job.get("error") or {}, job.get("method") or {}
    param = f" ({error['param']})" if error.get("param") else ""
    problem = f"{error.get('code') or 'error'}{param}: {one_line(error.get('message') or '')}" if error else "-"
    hyper = (method.get(method.get("type") or "") or {}).get("hyperparameters") or job.get("hyperparameters") or {}
    metadata = " ".join(f"{k}={v}" for k, v in (job.get("metadata") or {}).items())
    return [
        ("id", job["id"]), ("status", job["status"]), ("model", job["model"]), ("method", method.get("type") or "supervised"),
        ("fine_tuned_model", job.get("fine_tuned_model") or "-"),
        ("training_file", job.get("training_file") or "-"), ("validation_file", job.get("validation_file") or "-"),
        ("hyperparameters", " ".join(f"{k}={v}" for k, v in hyper.items()) or "-"), ("seed", str(job.get("seed", "-"))),
        ("suffix", job.get("suffix") or "-"), ("metadata", metadata or "-"),
        ("trained_tokens", str(job.get("trained_tokens") or "-")), ("created", when(job.get("created_at"))),
        ("estimated_finish", when(job.get("estimated_finish"))), ("finished", when(job.get("finished_at"))),
        ("result_files", ", ".join(job.get("result_files") or []) or "-"), ("error", problem),
    ]


def follow(api: FineTuningApi, job_id: str, interval: float) -> None:
    """Print the job's events as they come until it ends; a job that did not succeed is an error (exit 1)."""
    seen: set[str] = set()
    lost_since: float | None = None
    while True:
        try:
            job = api.job(job_id)  # before the events: by the time a job reads finished, its events are written
            events = api.new_events(job_id, seen)
        except Unreachable as err:
            lost_since = waited_for_server(err, lost_since)
            time.sleep(interval)
            continue
        lost_since = None
        for event in events:
            click.echo(event_line(event, job))
        if job["status"] in FINISHED:
            return outcome(job)
        time.sleep(interval)


def waited_for_server(err: Unreachable, since: float | None) -> float:
    """A server restart should not end a follow of a long job: wait up to RETRY_S, then give up."""
    now = time.monotonic()
    if since is None:
        click.echo(f"{err.message}; retrying for {RETRY_S:.0f} s", err=True)
        return now
    if now - since > RETRY_S:
        raise err
    return since


def outcome(job: dict[str, Any]) -> None:
    """The fine-tuned model, or the reason (one line) as an error: a script can test the exit code."""
    if job["status"] == "succeeded":
        click.echo(f"fine-tuned model: {job['fine_tuned_model']}")
        return
    if job["status"] == "cancelled":
        raise LoragError(f"Fine-tuning job {job['id']} was cancelled.")
    message = one_line((job.get("error") or {}).get("message") or "no reason given")
    raise LoragError(f"Fine-tuning job {job['id']} failed: {message}")


interval_option = click.option("--interval", type=click.FloatRange(min=0.05), default=1.5, show_default=True,
                               help="Seconds between polls.")


@click.group("ft")
@config_options
@functools.partial(server_options, envvar=True)
def ft_group() -> None:
    """Fine-tune on a running lorag server (OpenAI's Files and Fine-tuning APIs): upload, create, follow."""


@ft_group.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_api
def upload(api: FineTuningApi, path: Path) -> None:
    """Upload a JSONL training or validation file. Prints its file id (first, for scripts), size and name."""
    stored = api.upload(path)
    click.echo(f"{stored['id']}  {stored['bytes']} bytes  {stored['filename']}")


def file_id(api: FineTuningApi, value: str) -> str:
    """A local file is uploaded first; anything else is taken as a file id the server knows."""
    path = Path(value)
    if not path.is_file():
        return value
    stored = api.upload(path)
    click.echo(f"uploaded {path} as {stored['id']} ({stored['bytes']} bytes)", err=True)
    return str(stored["id"])


@ft_group.command("create")
@click.option("--model", required=True, help="The served base model, an adapter, or an ft: model to continue.")
@click.option("--training-file", required=True, metavar="FILE_ID|PATH", help="A file id, or a JSONL file to upload.")
@click.option("--validation-file", metavar="FILE_ID|PATH", help="A file id, or a JSONL file to upload.")
@click.option("--method", type=click.Choice(["supervised", "dpo"]), default="supervised", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), help="n_epochs (default: auto).")
@click.option("--batch-size", type=click.IntRange(min=1), help="(default: auto)")
@click.option("--lr-multiplier", type=click.FloatRange(min=0, min_open=True),
              help="learning_rate_multiplier (default: auto).")
@click.option("--beta", type=click.FloatRange(min=0, min_open=True), help="DPO's beta (default: auto).")
@click.option("--suffix", help="Goes into the model's name: ft:<base>:<org>:<suffix>:<job-id>.")
@click.option("--seed", type=click.IntRange(min=0))
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--wait/--no-wait", default=False, help="Follow the job until it ends (as `events --follow`).")
@interval_option
@pass_api
def create(api: FineTuningApi, model: str, training_file: str, validation_file: str | None, method: str,
           epochs: int | None, batch_size: int | None, lr_multiplier: float | None, beta: float | None,
           suffix: str | None, seed: int | None, metadata: tuple[str, ...], wait: bool, interval: float) -> None:
    """Start a fine-tuning job. Prints its id (alone on stdout); --wait follows it as `events --follow` does."""
    if beta is not None and method != "dpo":  # checked before any upload
        raise click.UsageError("--beta is a DPO hyperparameter: add --method dpo.")
    asked = {"n_epochs": epochs, "batch_size": batch_size, "learning_rate_multiplier": lr_multiplier, "beta": beta}
    hyper = {key: value for key, value in asked.items() if value is not None}
    optional = {"suffix": suffix, "seed": seed, "metadata": pairs(metadata, "--metadata") or None}
    body = {"model": model, "training_file": file_id(api, training_file),  # as the openai SDK sends it
            "method": {"type": method, **({method: {"hyperparameters": hyper}} if hyper else {})},
            **{key: value for key, value in optional.items() if value is not None}}
    if validation_file:
        body["validation_file"] = file_id(api, validation_file)
    job = api.call("POST", "/v1/fine_tuning/jobs", json=body)
    click.echo(job["id"])
    if wait:
        follow(api, job["id"], interval)


@ft_group.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--after", metavar="JOB_ID", help="Start after this job (the last one a previous page showed).")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="Only jobs with it (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_api
def list_(api: FineTuningApi, limit: int, after: str | None, metadata: tuple[str, ...], as_json: bool) -> None:
    """Your fine-tuning jobs, newest first."""
    params = {f"metadata[{key}]": value for key, value in pairs(metadata, "--metadata").items()}
    jobs = list(api.pages("/v1/fine_tuning/jobs", params, limit=limit, after=after))
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
        return
    if not jobs:
        click.echo("no fine-tuning jobs")
        return
    rows = [[j["id"], j["status"], j["model"], j.get("fine_tuned_model") or "-", when(j.get("created_at"))]
            for j in jobs]
    click.echo(table(["ID", "STATUS", "MODEL", "FINE_TUNED_MODEL", "CREATED"], rows))


@ft_group.command("show")
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print the job as the API returns it.")
@pass_api
def show(api: FineTuningApi, job_id: str, as_json: bool) -> None:
    """A job's status, model, hyperparameters, outcome and error."""
    job = api.job(job_id)
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    fields = job_fields(job)
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        click.echo(f"{name.ljust(width)}  {value}")


@ft_group.command("events")
@click.argument("job_id", metavar="JOB")
@click.option("--follow", "-f", "follow_", is_flag=True,
              help="Keep printing new events until the job ends; exit 1 if it failed or was cancelled.")
@interval_option
@pass_api
def events(api: FineTuningApi, job_id: str, follow_: bool, interval: float) -> None:
    """A job's events, oldest first. A progress line per logged step (loss, accuracy, eta), else the message."""
    if follow_:
        follow(api, job_id, interval)
        return
    for event in api.new_events(job_id, set()):
        click.echo(event_line(event))


@ft_group.command("checkpoints")
@click.argument("job_id", metavar="JOB")
@pass_api
def checkpoints(api: FineTuningApi, job_id: str) -> None:
    """A job's kept checkpoints, newest first. Each is served as `...:ckpt-step-N` once the job has succeeded."""
    found = list(api.pages(f"{job_path(job_id)}/checkpoints"))
    if not found:
        click.echo("no checkpoints")
        return

    def metric(checkpoint: dict[str, Any], key: str) -> str:
        value = checkpoint.get("metrics", {}).get(key)
        return "-" if value is None else f"{value:.4f}"

    rows = [[str(c["step_number"]), c["fine_tuned_model_checkpoint"], metric(c, "train_loss"),
             metric(c, "valid_loss"), when(c.get("created_at"))] for c in found]
    click.echo(table(["STEP", "MODEL", "TRAIN_LOSS", "VALID_LOSS", "CREATED"], rows))


def control(verb: str, summary: str) -> click.Command:
    """`cancel`, `pause` and `resume`: one POST each, then the job's new status."""
    @click.argument("job_id", metavar="JOB")
    @pass_api
    def command(api: FineTuningApi, job_id: str) -> None:
        job = api.job(job_id, verb)
        pausing = verb == "pause" and job["status"] == "running"
        note = " (it pauses after its current step, with a checkpoint)" if pausing else ""
        click.echo(f"{job['id']}: {job['status']}{note}")

    command.__doc__ = summary
    return ft_group.command(verb)(command)


control("cancel", "Cancel a job that has not ended. A running worker is stopped; nothing of the job is served.")
control("pause", "Pause a queued or running job. A running one stops after its current step, at a checkpoint.")
control("resume", "Put a paused job back in the queue. It goes on from its last checkpoint.")
