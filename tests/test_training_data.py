"""From stored traffic to training files: the selection rules (pure), then POST /v1/training_data through
real HTTP on the echo engine, each file checked line by line against the completions it came from."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner

from lorag.adapters.data import parse_example
from lorag.adapters.preference import parse_preference
from lorag.cli import cli
from lorag.loop import training_data
from lorag.loop.completions import StoredCompletion
from lorag.loop.feedback import Preference, Rating
from tests.echo_server import (
    TRAINER,
    USER_KEY,
    EchoServer,
    echo_server,
    echo_settings,
    trainer_keys,
)

EMAIL = "jane.doe@example.com"


def stored(cid: str, question: str, answer: str, created: int = 0, **extra: Any) -> StoredCompletion:
    return StoredCompletion(id=cid, owner="k", created=created, expires_at=10**10, model="support", domain="support",
                            adapter=None, metadata=extra.pop("metadata", {}),
                            messages=[{"role": "user", "content": question}],
                            response={"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]},
                            context={"prompt_messages": [{"role": "system", "content": "ctx"},
                                                         {"role": "user", "content": question}]})


def rating(rid: str, cid: str, score: float | None, corrected: str | None = None, updated: int = 0) -> Rating:
    return Rating(rid, cid, "k", score, corrected, None, 0, updated)


def test_supervised_keeps_good_answers_and_puts_corrections_in_place_of_bad_ones() -> None:
    records = [stored("a", "q1", "good"), stored("b", "q2", "bad"), stored("c", "q3", "meh"), stored("d", "q4", "?")]
    ratings = [rating("r1", "a", 1.0), rating("r2", "a", 0.0), rating("r3", "b", -1.0, "fixed", updated=1),
               rating("r4", "b", None, "fixed again", updated=2), rating("r5", "c", 0.2)]
    lines = [line.to_json() for line in training_data.supervised(records, ratings, min_score=0.5)]
    assert [(line["messages"][-1]["content"], line["provenance"]["kind"], line["provenance"]["completions"])
            for line in lines] == [("good", "rated", ["a"]), ("fixed again", "corrected", ["b"])]
    assert lines[0]["provenance"]["ratings"] == ["r1", "r2"] and lines[1]["provenance"]["ratings"] == ["r4"]
    for line in lines:
        parse_example(line)  # what training reads
    rendered = training_data.supervised(records, ratings, view="rendered")[0].record
    assert rendered["messages"][0] == {"role": "system", "content": "ctx"}


def test_preferences_from_stated_pairs_and_from_rated_answers_to_one_prompt() -> None:
    records = [stored("a", "same", "A", created=1), stored("b", "same", "B", created=2),
               stored("c", "same", "C", created=3), stored("d", "other", "D")]
    pairs = [Preference("p1", "b", "a", "k", None, 0, 0)]
    ratings = [rating("r1", "a", 0.9), rating("r2", "c", -0.5), rating("r3", "d", 1.0)]
    lines = [line.to_json() for line in training_data.preferences(records, ratings, pairs, margin=0.5)]
    assert [(line["preferred_output"][0]["content"], line["non_preferred_output"][0]["content"],
             line["provenance"]["kind"]) for line in lines] == [("B", "A", "preferred"), ("A", "C", "rated_pair")]
    assert lines[1]["provenance"]["scores"] == [0.9, -0.5]
    for line in lines:
        parse_preference(line)
    assert training_data.preferences(records, ratings, [], margin=2.0) == []


def test_best_of_n_pairs_the_best_and_the_worst_when_far_enough_apart() -> None:
    prompt = [{"role": "user", "content": "q"}]
    line = training_data.best_of_n(prompt, ["w", "x", "y", "z"], [0.2, 1.0, None, 0.0], margin=0.5,
                                   completion="c", grader="fact")
    assert line is not None and line.record["preferred_output"][0]["content"] == "x"
    assert line.record["non_preferred_output"][0]["content"] == "z"
    assert line.to_json()["provenance"] == {"kind": "best_of_n", "completions": ["c"], "grader": "fact", "n": 4,
                                            "scores": [1.0, 0.0]}
    assert training_data.best_of_n(prompt, ["a", "b"], [0.6, 0.5], margin=0.5, completion="c", grader="f") is None


def test_the_holdout_split_is_seeded() -> None:
    items = [f"item-{i}" for i in range(200)]
    train, held = training_data.split_holdout(items, 0.25, seed=7)
    assert sorted(train + held) == sorted(items) and 25 < len(held) < 75
    assert training_data.split_holdout(items, 0.25, seed=7) == (train, held)
    assert training_data.split_holdout(items, 0.25, seed=8)[1] != held


# -- through the server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    graders = [{"type": "string_check", "name": "fact", "input": "{{sample.output_text}}",
                "reference": "{{item.reference}}", "operation": "ilike"}]
    settings = echo_settings(
        tmp_path_factory.mktemp("data"), server={"api_keys": trainer_keys()},
        domains={"support": {"graders": graders}, "guarded": {}},
        plugins={"domains": {"guarded": {"enabled": ["pii"]}}},
    )
    with echo_server(settings) as server:
        yield server


def api(echo: EchoServer, key: str = TRAINER) -> httpx.Client:
    return httpx.Client(base_url=echo.url, headers={"authorization": f"Bearer {key}"}, timeout=300)


def ask(client: openai.OpenAI, model: str, question: str, **metadata: str) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], store=True,
                                          metadata={"run": "data", **metadata})


def file_lines(echo: EchoServer, file_id: str) -> list[dict[str, Any]]:
    content = echo.client(TRAINER).files.content(file_id).text
    return [json.loads(line) for line in content.splitlines()]


def test_a_supervised_file_from_ratings_is_guarded_and_can_be_trained_on(echo: EchoServer) -> None:
    client = echo.client(TRAINER)
    good, bad = ask(client, "guarded", "good one"), ask(client, "guarded", f"mail {EMAIL}?")
    ask(client, "guarded", "never rated")
    with api(echo) as http:
        http.post(f"/v1/chat/completions/{good.id}/feedback", json={"thumbs": "up"}).raise_for_status()
        http.post(f"/v1/chat/completions/{bad.id}/feedback",
                  json={"thumbs": "down", "corrected": f"Write to {EMAIL}."}).raise_for_status()
        made = http.post("/v1/training_data", json={"kind": "supervised", "domain": "guarded",
                                                    "metadata": {"run": "data"}}).json()
    assert made["lines"] == 2 and made["considered"] == 3 and made["file"]["purpose"] == "fine-tune"
    lines = file_lines(echo, made["file"]["id"])
    assert [line["provenance"]["completions"] for line in lines] == [[good.id], [bad.id]]
    assert lines[0]["messages"] == [{"role": "user", "content": "good one"},
                                    {"role": "assistant", "content": "echo: good one"}]
    assert EMAIL not in json.dumps(lines) and "[EMAIL_1]" in lines[1]["messages"][-1]["content"]  # guarded again
    job = client.fine_tuning.jobs.create(model="echo-base", training_file=made["file"]["id"])
    assert job.training_file == made["file"]["id"]  # the file is a fine-tuning file like an upload
    client.fine_tuning.jobs.cancel(job.id)


def test_deleting_a_completion_takes_its_lines_out_of_the_files_made_from_it(echo: EchoServer) -> None:
    client = echo.client(TRAINER)
    kept, deleted = ask(client, "support", "stays", batch="del"), ask(client, "support", "goes", batch="del")
    with api(echo) as http:
        for made in (kept, deleted):
            http.post(f"/v1/chat/completions/{made.id}/feedback", json={"score": 1}).raise_for_status()
        built = http.post("/v1/training_data", json={"kind": "supervised", "metadata": {"batch": "del"}}).json()
    assert [line["provenance"]["completions"] for line in file_lines(echo, built["file"]["id"])] == [[kept.id],
                                                                                                  [deleted.id]]
    answer = client.chat.completions.delete(deleted.id)
    assert answer.model_extra["lorag"]["derived_files"] == [built["file"]["id"]]
    assert [line["provenance"]["completions"] for line in file_lines(echo, built["file"]["id"])] == [[kept.id]]
    assert client.files.retrieve(built["file"]["id"]).bytes == len(client.files.content(built["file"]["id"]).content)


def test_preference_and_best_of_n_files(echo: EchoServer) -> None:
    client = echo.client(TRAINER)
    echo.engine.reply("first")
    one = ask(client, "support", "capital of France?", batch="pref", reference="Paris")
    echo.engine.reply("second")
    two = ask(client, "support", "capital of France?", batch="pref", reference="Paris")
    with api(echo) as http:
        http.post("/v1/feedback/preferences", json={"chosen": two.id, "rejected": one.id}).raise_for_status()
        made = http.post("/v1/training_data", json={"kind": "preference", "metadata": {"batch": "pref"}}).json()
        lines = file_lines(echo, made["file"]["id"])
        assert [(x["preferred_output"][0]["content"], x["non_preferred_output"][0]["content"]) for x in lines] == [
            ("second", "first")]
        echo.engine.reply("It is Paris.", "No idea.", "paris!", "Lyon")  # n=4 samples of the first prompt
        echo.engine.reply("Paris", "Paris", "Paris", "Paris")  # the second: all equal, no pair
        best = http.post("/v1/training_data", json={"kind": "best_of_n", "domain": "support", "n": 4,
                                                    "metadata": {"batch": "pref"}, "margin": 0.5}).json()
    lines = file_lines(echo, best["file"]["id"])
    assert best["lines"] == 1 and best["considered"] == 2
    assert lines[0]["input"]["messages"] == [{"role": "user", "content": "capital of France?"}]
    assert lines[0]["preferred_output"][0]["content"] == "It is Paris."
    assert lines[0]["non_preferred_output"][0]["content"] == "No idea."
    assert lines[0]["provenance"] == {"kind": "best_of_n", "completions": [one.id], "grader": "fact", "n": 4,
                                      "scores": [1.0, 0.0],
                                      "metadata": {"run": "data", "batch": "pref", "reference": "Paris"}}


def test_distillation_with_lorag_itself_as_the_teacher_in_process_and_over_http(echo: EchoServer,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    client = echo.client(TRAINER)
    made = [ask(client, "support", f"distil {i}", batch="distil") for i in range(3)]
    echo.engine.reply(*[lambda prompt, adapter: "teacher says: " + prompt.split("<|user|>")[-1].split("<|end|>")[0]
                        for _ in range(3)])
    with api(echo) as http:
        local = http.post("/v1/training_data", json={
            "kind": "distillation", "metadata": {"batch": "distil"},
            "teacher": {"model": "support", "options": {"top_k": 3}}}).json()
    lines = file_lines(echo, local["file"]["id"])
    assert [(x["messages"][0]["content"], x["messages"][1]["content"], x["provenance"]["completions"])
            for x in lines] == [(f"distil {i}", f"teacher says: distil {i}", [made[i].id]) for i in range(3)]
    assert lines[0]["provenance"]["teacher"] == {"model": "support", "endpoint": "lorag", "options": {"top_k": 3}}
    monkeypatch.setenv("LORAG_TEACHER_KEY", USER_KEY)
    with api(echo) as http:
        remote = http.post("/v1/training_data", json={
            "kind": "distillation", "prompts": [[{"role": "user", "content": "given prompt"}]],
            "teacher": {"model": "support", "base_url": echo.api, "api_key_env": "LORAG_TEACHER_KEY"}}).json()
    [line] = file_lines(echo, remote["file"]["id"])
    assert line["messages"][-1]["content"] == "echo: given prompt" and line["provenance"]["completions"] == []
    assert line["provenance"]["teacher"]["endpoint"] == echo.api


def test_bad_requests_are_one_clear_error_and_write_nothing(echo: EchoServer) -> None:
    before = len(echo.client(TRAINER).files.list().data)
    with api(echo) as http:
        for body, param in (({"kind": "distillation"}, None), ({"kind": "nope"}, "kind"),
                            ({"kind": "best_of_n", "domain": "guarded"}, "grader"),
                            ({"kind": "supervised", "domain": "missing"}, "domain"),
                            ({"kind": "supervised", "metadata": {"run": "no-such-run"}}, None)):
            refused = http.post("/v1/training_data", json=body)
            assert refused.status_code == 400, body
            assert param is None or refused.json()["error"]["param"] == param
        assert http.post("/v1/training_data", json={"kind": "supervised"},
                         headers={"authorization": f"Bearer {USER_KEY}"}).status_code == 403
    assert len(echo.client(TRAINER).files.list().data) == before


def test_lorag_data_build_through_the_cli(echo: EchoServer, tmp_path: Path) -> None:
    client = echo.client(TRAINER)
    made = [ask(client, "support", f"cli question {i}", batch="cli") for i in range(3)]
    with api(echo) as http:
        for completion in made:
            http.post(f"/v1/chat/completions/{completion.id}/feedback", json={"thumbs": "up"}).raise_for_status()
    output = tmp_path / "train.jsonl"
    done = CliRunner().invoke(cli, ["data", "build", "supervised", "--server", echo.url, "--api-key", TRAINER,
                                    "--metadata", "batch=cli", "--output", str(output)])
    assert done.exit_code == 0, (done.output, done.exception)
    assert "\n3 supervised lines from 3 stored completion(s): file-" in "\n" + done.stdout
    assert [json.loads(line)["provenance"]["completions"] for line in output.read_text().splitlines()] == [
        [c.id] for c in made]
    refused = CliRunner().invoke(cli, ["data", "build", "supervised", "--server", echo.url, "--api-key", TRAINER,
                                       "--metadata", "batch=none-such"])
    assert refused.exit_code != 0 and "No supervised lines came out of 0 stored completion(s)" in str(
        refused.exception)
    bad = CliRunner().invoke(cli, ["data", "build", "distillation", "--server", echo.url, "--api-key", TRAINER,
                                   "--teacher-url", "http://x"])
    assert bad.exit_code == 2 and "--teacher" in bad.output
