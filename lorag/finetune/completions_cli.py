"""`lorag completions`: the stored chat completions of a running lorag server, and the feedback on them.

Stored completions (`store: true`) and their ratings and preferences are the raw material of
the next fine-tuning run, so this sits beside `lorag ft` and talks to the server the same way:
through its HTTP API (OpenAI's /v1/chat/completions routes, lorag's feedback routes), found
and authenticated as `lorag ft` is (--server or $LORAG_SERVER; --api-key or $LORAG_API_KEY).
Any key sees its own completions, an admin key every key's. Errors are one-line LoragErrors.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from lorag.cli_options import config_options
from lorag.finetune.cli_client import FineTuningApi, pairs, passing_api, server_options, table

LIST_PATH = "/v1/chat/completions"
ANSWER_CHARS = 60  # of the answer, in `list`


def completion_path(completion_id: str) -> str:
    """The completion's URL, its id quoted: an id with a '/' must be an unknown completion, not another route."""
    return f"{LIST_PATH}/{quote(completion_id, safe='')}"


ANY_KEY = "API key: its own completions; an admin key: everyone's"
pass_api = passing_api(ANY_KEY)


def iso(timestamp: float | None) -> str:
    """Local time in ISO 8601, to the second, with its UTC offset."""
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds") if timestamp else "-"


def answer_of(completion: dict[str, Any]) -> str:
    """The first choice's text on one line."""
    choices = completion.get("choices") or [{}]
    return flat(str((choices[0].get("message") or {}).get("content") or ""))


def served_by(completion: dict[str, Any]) -> str:
    """domain/adapter from lorag's extras: what answered (a base-model answer has neither)."""
    extras = completion.get("lorag") or {}
    domain, adapter = extras.get("domain") or "-", extras.get("adapter")
    return f"{domain}/{adapter}" if adapter else domain


def list_row(completion: dict[str, Any]) -> list[str]:
    return [completion["id"], iso(completion.get("created")), completion.get("model") or "-", served_by(completion),
            answer_of(completion)[:ANSWER_CHARS]]


def flat(text: str | None) -> str:
    """Text on one line (a table cell); "-" for none."""
    return " ".join(text.split()) if text else "-"


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


@click.group("completions")
@config_options
@functools.partial(server_options, envvar=True, key_help=ANY_KEY)
def completions_group() -> None:
    """Stored chat completions (`store: true`) on a running lorag server: list, show, rate, prefer, delete."""


@completions_group.command("list")
@click.option("--model", help="Only completions asked of this model (a domain, an adapter, the base).")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="Only those with it (repeatable).")
@click.option("--order", type=click.Choice(["asc", "desc"]), default="asc", show_default=True,
              help="By creation time.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--after", metavar="ID", help="Start after this completion (the last one a previous page showed).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, as the API returns each.")
@pass_api
def list_(api: FineTuningApi, model: str | None, metadata: tuple[str, ...], order: str, limit: int,
          after: str | None, as_json: bool) -> None:
    """Stored completions, one per line: id, created, model, domain/adapter, the answer's beginning."""
    params = {f"metadata[{key}]": value for key, value in pairs(metadata, "--metadata").items()}
    params.update({"order": order, **({"model": model} if model else {})})
    found = list(api.pages(LIST_PATH, params, limit=limit, after=after))
    if as_json:
        for completion in found:
            click.echo(json.dumps(completion, ensure_ascii=False))
        return
    if not found:
        click.echo("no stored completions")
        return
    click.echo(table(["ID", "CREATED", "MODEL", "DOMAIN/ADAPTER", "ANSWER"], [list_row(c) for c in found]))


@completions_group.command("show")
@click.argument("completion_id", metavar="ID")
@click.option("--messages", "with_messages", is_flag=True,
              help="Add the conversation as stored (after the input guards) under `messages`.")
@pass_api
def show(api: FineTuningApi, completion_id: str, with_messages: bool) -> None:
    """A stored completion as the API returns it (pretty JSON)."""
    path = completion_path(completion_id)
    completion = api.call("GET", path)
    if with_messages:
        completion["messages"] = list(api.pages(f"{path}/messages"))
    click.echo(dumps(completion))


@completions_group.command("set-metadata")
@click.argument("completion_id", metavar="ID")
@click.argument("metadata", nargs=-1, metavar="KEY=VALUE...")
@click.option("--replace", is_flag=True, help="Replace all of its metadata with these pairs (none: clear it).")
@pass_api
def set_metadata(api: FineTuningApi, completion_id: str, metadata: tuple[str, ...], replace: bool) -> None:
    """Set metadata keys of a completion (the only thing of it that may change). Prints its metadata."""
    pairs_ = pairs(metadata, "KEY=VALUE")
    if not pairs_ and not replace:
        raise click.UsageError("Give KEY=VALUE pairs, or --replace alone to clear the metadata.")
    path = completion_path(completion_id)
    current = {} if replace else api.call("GET", path).get("metadata") or {}
    updated = api.call("POST", path, json={"metadata": {**current, **pairs_}})
    shown = " ".join(f"{key}={value}" for key, value in (updated.get("metadata") or {}).items())
    click.echo(f"{updated['id']}: {shown or '(no metadata)'}")


@completions_group.command("delete")
@click.argument("completion_id", metavar="ID")
@pass_api
def delete(api: FineTuningApi, completion_id: str) -> None:
    """Delete a stored completion, with its ratings and the preferences it is in."""
    deleted = api.call("DELETE", completion_path(completion_id))
    click.echo(f"{deleted['id']}: deleted")


def rating_body(score: float | None, up: bool, down: bool, corrected: str | None, comment: str | None) -> dict[str, Any]:
    """The feedback route's body; a usage error for two verdicts at once or for nothing to say."""
    verdicts = [name for name, given in (("--score", score is not None), ("--up", up), ("--down", down)) if given]
    if len(verdicts) > 1:
        raise click.UsageError(f"{' and '.join(verdicts)}: give one of --score, --up and --down.")
    body = {"score": score, "thumbs": "up" if up else "down" if down else None, "corrected": corrected,
            "comment": comment}
    if not any(value is not None for value in body.values()):
        raise click.UsageError("Say something: --score, --up, --down, --corrected(-file) or --comment.")
    return {key: value for key, value in body.items() if value is not None}


@completions_group.command("rate")
@click.argument("completion_id", metavar="ID")
@click.option("--score", type=click.FloatRange(-1, 1), help="From -1 (bad) to 1 (good).")
@click.option("--up", is_flag=True, help="Thumbs up (score 1).")
@click.option("--down", is_flag=True, help="Thumbs down (score -1).")
@click.option("--corrected", help="The answer it should have given.")
@click.option("--corrected-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The answer it should have given, from a UTF-8 text file.")
@click.option("--comment")
@pass_api
def rate(api: FineTuningApi, completion_id: str, score: float | None, up: bool, down: bool, corrected: str | None,
         corrected_file: Path | None, comment: str | None) -> None:
    """Rate a completion. Rating it again replaces your earlier rating (same rating id)."""
    if corrected is not None and corrected_file is not None:
        raise click.UsageError("--corrected and --corrected-file: give one.")
    if corrected_file is not None:
        corrected = corrected_file.read_text(encoding="utf-8")
    body = rating_body(score, up, down, corrected, comment)
    rating = api.call("POST", f"{completion_path(completion_id)}/feedback", json=body)
    click.echo(f"{rating['id']}  {rating['completion_id']}  score {score_text(rating.get('score'))}")


def score_text(score: float | None) -> str:
    return "-" if score is None else f"{score:g}"


@completions_group.command("prefer")
@click.argument("chosen", metavar="CHOSEN_ID")
@click.argument("rejected", metavar="REJECTED_ID")
@click.option("--comment")
@pass_api
def prefer(api: FineTuningApi, chosen: str, rejected: str, comment: str | None) -> None:
    """CHOSEN_ID answers the same prompt better than REJECTED_ID. Said again about the pair, it replaces the earlier word."""
    body = {"chosen": chosen, "rejected": rejected, **({"comment": comment} if comment is not None else {})}
    preference = api.call("POST", "/v1/feedback/preferences", json=body)
    click.echo(f"{preference['id']}  {preference['chosen']} > {preference['rejected']}")


@completions_group.command("feedback")
@click.argument("completion_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer.")
@pass_api
def feedback(api: FineTuningApi, completion_id: str, as_json: bool) -> None:
    """A completion's ratings and the preferences it is in (yours; an admin key: everyone's)."""
    found = api.call("GET", f"{completion_path(completion_id)}/feedback")
    if as_json:
        click.echo(dumps(found))
        return
    ratings = [[r["id"], r["key"], score_text(r.get("score")), "yes" if r.get("corrected") else "-",
                flat(r.get("comment")), iso(r.get("updated_at"))] for r in found["ratings"]]
    click.echo(table(["RATING", "KEY", "SCORE", "CORRECTED", "COMMENT", "UPDATED"], ratings) if ratings
               else "no ratings")
    preferences = [[p["id"], p["key"], p["chosen"], p["rejected"], flat(p.get("comment")),
                    iso(p.get("updated_at"))] for p in found["preferences"]]
    click.echo(table(["PREFERENCE", "KEY", "CHOSEN", "REJECTED", "COMMENT", "UPDATED"], preferences) if preferences
               else "no preferences")
