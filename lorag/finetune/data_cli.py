"""`lorag data build`: a running server's stored completions as a fine-tuning file (POST /v1/training_data).

The server selects, samples, asks teachers, grades and guards (lorag.improve.data); this command
sends the request, waits (best-of-n and distillation generate, so it may take minutes), and says
what came out: the file in the Files API, ready for `lorag ft create`, and, with --output, a local
copy. Found and authenticated as `lorag ft` is (a key with the fine_tune scope).
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from lorag.cli_options import config_options
from lorag.errors import LoragError
from lorag.finetune.cli_client import FineTuningApi, pairs, pass_api, server_options

KINDS = ("supervised", "preference", "best_of_n", "distillation")
BUILD_TIMEOUT_S = 24 * 3600.0  # a long best-of-n or distillation run is still one request


@click.group("data")
@config_options
@functools.partial(server_options, envvar=True)
def data_group() -> None:
    """Training files from stored completions: supervised, preference, best-of-n, distillation."""


def timestamp(value: str | None, flag: str) -> int | None:
    """Unix seconds, or an ISO 8601 date or time (local unless it says otherwise)."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    try:
        return int(datetime.fromisoformat(value).astimezone().timestamp())
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither unix seconds nor an ISO 8601 date", param_hint=flag) from None


def read_prompts(path: Path | None) -> list[Any] | None:
    """Conversations for distillation: one JSON list of messages (or {"messages": [...]}) per line."""
    if path is None:
        return None
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            raise LoragError(f"{path}: line {number}: not valid JSON") from None
        prompts.append(value["messages"] if isinstance(value, dict) and "messages" in value else value)
    return prompts


def save(api: FineTuningApi, file_id: str, output: Path) -> None:
    """The file's content at `output`, whole or not at all (written aside, then renamed)."""
    assert api.backend.client is not None  # the build's call went through it
    response = api.backend.client.get(f"/v1/files/{file_id}/content")
    if response.status_code >= 400:
        raise LoragError(f"could not download {file_id}: HTTP {response.status_code}")
    partial = output.with_name(f".{output.name}.partial")
    partial.write_bytes(response.content)
    os.replace(partial, output)


@data_group.command("build")
@click.argument("kind", type=click.Choice(KINDS))
@click.option("--domain", help="Only this domain's completions (best_of_n: whose graders score).")
@click.option("--model", help="Only completions asked of this model.")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="Only completions with it (repeat).")
@click.option("--since", help="Made at or after (ISO 8601 or unix seconds).")
@click.option("--until", help="Made before (ISO 8601 or unix seconds).")
@click.option("--prompt", type=click.Choice(["conversation", "rendered"]), default="conversation", show_default=True,
              help="Lines start with the conversation, or with the full prompt the model saw (context included).")
@click.option("--min-score", type=float, default=0.5, show_default=True, help="supervised: mean rating at least.")
@click.option("--margin", type=float, default=0.5, show_default=True, help="preference, best_of_n: score gap.")
@click.option("-n", "--samples", "n", type=int, default=4, show_default=True, help="best_of_n: answers per prompt.")
@click.option("--grader", help="best_of_n: one of the domain's graders (default: the mean of all).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="best_of_n: sampling temperature.")
@click.option("--teacher", help="distillation: the teacher model (a domain on the server, or a remote model).")
@click.option("--teacher-url", help="distillation: the teacher's OpenAI-compatible base URL (default: the server).")
@click.option("--teacher-key-env", help="distillation: the environment variable (on the server) with its key.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="distillation: conversations to ask (JSONL) instead of stored ones.")
@click.option("--holdout", type=float, default=0.0, show_default=True, help="A seeded share held out in a 2nd file.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--filename", help="The file's name in the Files API (default: from the kind and filters).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also save the lines here.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@pass_api
def build(api: FineTuningApi, kind: str, domain: str | None, model: str | None, metadata: tuple[str, ...],
          since: str | None, until: str | None, prompt: str, min_score: float, margin: float, n: int,
          grader: str | None, temperature: float, teacher: str | None, teacher_url: str | None,
          teacher_key_env: str | None, prompts_file: Path | None, holdout: float, seed: int, filename: str | None,
          output: Path | None, as_json: bool) -> None:
    """Build a KIND training file from the server's stored completions."""
    body: dict[str, Any] = {
        "kind": kind, "domain": domain, "model": model, "metadata": pairs(metadata, "--metadata") or None,
        "since": timestamp(since, "--since"), "until": timestamp(until, "--until"), "prompt": prompt,
        "min_score": min_score, "margin": margin, "n": n, "grader": grader, "temperature": temperature,
        "prompts": read_prompts(prompts_file), "holdout": holdout, "seed": seed, "filename": filename}
    if teacher or teacher_url or teacher_key_env:
        if not teacher:
            raise click.UsageError("--teacher-url and --teacher-key-env go with --teacher MODEL")
        body["teacher"] = {"model": teacher, "base_url": teacher_url, "api_key_env": teacher_key_env}
    body = {key: value for key, value in body.items() if value is not None}
    made = api.call("POST", "/v1/training_data", json=body, timeout=BUILD_TIMEOUT_S)
    if output is not None:
        save(api, made["file"]["id"], output)
    if as_json:
        click.echo(json.dumps(made, indent=2))
        return
    click.echo(f"{made['lines']} {kind} lines from {made['considered']} stored completion(s): "
               f"{made['file']['id']} ({made['file']['filename']})" + (f", saved to {output}" if output else ""))
    if made.get("holdout_file"):
        click.echo(f"{made['holdout_lines']} held out: {made['holdout_file']['id']} "
                   f"({made['holdout_file']['filename']})")
    if made.get("skipped"):
        click.echo("left out: " + ", ".join(f"{count} {why.replace('_', ' ')}" for why, count in made["skipped"].items()))
    click.echo(f"next: lorag ft create --model MODEL --training-file {made['file']['id']}")
