"""`lorag completions` against a real lorag server over HTTP (the echo server: tests/echo_server.py).

Completions are stored with the official `openai` client (`store: true`), then listed, shown,
rated, preferred, re-labelled and deleted through the CLI, in process (click's CliRunner, as
tests/test_ft_cli.py does); the errors also through the console entry point, as a person sees them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from click.testing import CliRunner, Result

from lorag.cli import cli
from tests.echo_server import (
    OTHER_TRAINER,
    USER_KEY,
    EchoServer,
    echo_server,
    echo_settings,
    trainer_keys,
)
from tests.test_ft_cli import failed_with, logs_to_stderr, lorag  # noqa: F401 (logs_to_stderr: an autouse fixture)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    settings = echo_settings(tmp_path_factory.mktemp("completions-cli"), server={"api_keys": trainer_keys()},
                             domains={"support": {"system_prompt": "Be kind."}})
    with echo_server(settings) as server:
        yield server


@pytest.fixture
def client(echo: EchoServer) -> openai.OpenAI:
    echo.engine.replies.clear()
    return echo.client()


def completions(echo: EchoServer, *args: str, key: str = USER_KEY) -> Result:
    """`lorag completions --server URL --api-key KEY ARGS` in process; a LoragError stays in result.exception."""
    return CliRunner().invoke(cli, ["completions", "--server", echo.url, "--api-key", key, *args])


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def ask(client: openai.OpenAI, question: str, **extra: Any) -> Any:
    return client.chat.completions.create(model="support", messages=[{"role": "user", "content": question}],
                                          store=True, **extra)


def ids_listed(stdout: str) -> list[str]:
    header, *rows = stdout.splitlines()
    assert header.split() == ["ID", "CREATED", "MODEL", "DOMAIN/ADAPTER", "ANSWER"]
    return [row.split()[0] for row in rows]


def test_list_filters_orders_and_prints_json_lines(echo: EchoServer, client: openai.OpenAI) -> None:
    made = [ask(client, f"question {i}", metadata={"run": "cli-list", "parity": str(i % 2)}) for i in range(3)]
    client.chat.completions.create(model="support", messages=[{"role": "user", "content": "not kept"}])
    out = ok(completions(echo, "list", "--metadata", "run=cli-list"))
    assert ids_listed(out) == [c.id for c in made]
    row = out.splitlines()[1].split()
    assert row[2:] == ["support", "support", "echo:", "question", "0"] and row[1].startswith("20")
    assert ids_listed(ok(completions(echo, "list", "--metadata", "run=cli-list", "--order", "desc",
                                     "--limit", "2"))) == [made[2].id, made[1].id]
    odd = ok(completions(echo, "list", "--metadata", "run=cli-list", "--metadata", "parity=1", "--model", "support"))
    assert ids_listed(odd) == [made[1].id]
    lines = ok(completions(echo, "list", "--metadata", "run=cli-list", "--json")).splitlines()
    parsed = [json.loads(line) for line in lines]
    assert [c["id"] for c in parsed] == [c.id for c in made] and parsed[0]["metadata"]["run"] == "cli-list"
    assert ok(completions(echo, "list", "--metadata", "run=none")).strip() == "no stored completions"
    assert ok(completions(echo, "list", "--metadata", "run=cli-list", key=OTHER_TRAINER)).strip() == \
        "no stored completions"  # a key sees its own


def test_show_with_messages_set_metadata_and_delete(echo: EchoServer, client: openai.OpenAI) -> None:
    made = ask(client, "show me", metadata={"stage": "draft"})
    shown = json.loads(ok(completions(echo, "show", made.id)))
    assert shown["id"] == made.id and shown["choices"][0]["message"]["content"] == "echo: show me"
    assert "messages" not in shown and shown["lorag"]["domain"] == "support"
    conversation = json.loads(ok(completions(echo, "show", made.id, "--messages")))["messages"]
    assert [(m["role"], m["content"]) for m in conversation] == [("user", "show me")]

    assert ok(completions(echo, "set-metadata", made.id, "stage=final", "team=docs")).strip() == \
        f"{made.id}: stage=final team=docs"
    assert ok(completions(echo, "set-metadata", made.id, "--replace", "only=this")).strip() == f"{made.id}: only=this"
    assert client.chat.completions.retrieve(made.id).metadata == {"only": "this"}

    assert ok(completions(echo, "delete", made.id)).strip() == f"{made.id}: deleted"
    failed_with(completions(echo, "show", made.id), f"No stored chat completion '{made.id}'")
    failed_with(completions(echo, "delete", made.id), f"No stored chat completion '{made.id}'")


def test_rate_prefer_and_read_the_feedback(echo: EchoServer, client: openai.OpenAI, tmp_path: Path) -> None:
    echo.engine.reply("Answer one.")
    one = ask(client, "same prompt")
    echo.engine.reply("Answer two.")
    two = ask(client, "same prompt")
    rating_id, rated, _, score = ok(completions(echo, "rate", one.id, "--up")).split()
    assert rating_id.startswith("rating-") and (rated, score) == (one.id, "1")
    corrected = tmp_path / "better.txt"
    corrected.write_text("A better answer.\n", encoding="utf-8")
    again = ok(completions(echo, "rate", one.id, "--score", "-0.5", "--corrected-file", str(corrected),
                           "--comment", "too short"))
    assert again.split() == [rating_id, one.id, "score", "-0.5"]  # the same rating, replaced
    preferred = ok(completions(echo, "prefer", two.id, one.id, "--comment", "clearer")).split()
    assert preferred[0].startswith("pref-") and preferred[1:] == [two.id, ">", one.id]

    found = json.loads(ok(completions(echo, "feedback", one.id, "--json")))
    assert [(r["id"], r["score"], r["corrected"], r["comment"]) for r in found["ratings"]] == \
        [(rating_id, -0.5, "A better answer.\n", "too short")]
    assert [(p["chosen"], p["rejected"], p["comment"]) for p in found["preferences"]] == [(two.id, one.id, "clearer")]
    lines = ok(completions(echo, "feedback", one.id)).splitlines()
    assert lines[0].split() == ["RATING", "KEY", "SCORE", "CORRECTED", "COMMENT", "UPDATED"]
    assert lines[1].split()[0] == rating_id and lines[1].split()[2:5] == ["-0.5", "yes", "too"]
    assert lines[2].split()[0] == "PREFERENCE" and lines[3].split()[2:4] == [two.id, one.id]
    assert ok(completions(echo, "feedback", two.id)).splitlines()[0] == "no ratings"
    failed_with(completions(echo, "prefer", one.id, ask(client, "another prompt").id), "different prompts")


def test_errors_are_one_line_through_the_entry_point(echo: EchoServer, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LORAG_SERVER", echo.url)
    monkeypatch.setenv("LORAG_API_KEY", USER_KEY)
    for args in (("show", "chatcmpl-nosuch"), ("rate", "chatcmpl-nosuch", "--up"), ("feedback", "chatcmpl-nosuch"),
                 ("delete", "chatcmpl-nosuch")):
        code, _, err = lorag(monkeypatch, capsys, "completions", *args)
        assert (code, err) == (1, "error: No stored chat completion 'chatcmpl-nosuch'.\n"), args
    assert lorag(monkeypatch, capsys, "completions", "show", "../../v1/models")[1:] == ("", "error: Not Found\n")
    code, _, err = lorag(monkeypatch, capsys, "completions", "rate", "chatcmpl-nosuch", "--score", "3")
    assert code == 2 and err.count("\n") == 1 and "--score" in err and "Traceback" not in err
    code, _, err = lorag(monkeypatch, capsys, "completions", "rate", "x", "--up", "--score", "1")
    assert code == 2 and err == "error: --score and --up: give one of --score, --up and --down.\n"


def test_usage_errors_exit_2(echo: EchoServer, client: openai.OpenAI) -> None:
    made = ask(client, "usage")
    for args, words in ((("--score", "3"), "3"), (("--up", "--score", "1"), "--score and --up"),
                        (("--up", "--down"), "--up and --down"), ((), "Say something"),
                        (("--corrected", "x", "--corrected-file", __file__), "give one")):
        result = completions(echo, "rate", made.id, *args)
        assert result.exit_code == 2 and words in result.output, (args, result.output)
    result = completions(echo, "set-metadata", made.id, "novalue")
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    assert completions(echo, "set-metadata", made.id).exit_code == 2
