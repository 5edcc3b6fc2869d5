"""Stored chat completions and feedback through real HTTP: the official `openai` client on the echo engine.

What is stored is what was sent and what the model saw after the guards (tests/echo_server.py
runs the real app; only generation is the echo engine's).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.echo_server import (
    ADMIN_KEY,
    OTHER_TRAINER,
    USER_KEY,
    EchoServer,
    echo_server,
    echo_settings,
    trainer_keys,
)

EMAIL = "jane.doe@example.com"


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    settings = echo_settings(
        tmp_path_factory.mktemp("stored"), server={"api_keys": trainer_keys()},
        domains={"support": {"system_prompt": "Be kind."}, "logged": {"store": True, "store_retention_days": 2},
                 "redacted": {}},
        plugins={"domains": {"redacted": {"enabled": ["pii"], "hold_back_chars": 32}}},
    )
    with echo_server(settings) as server:
        yield server


@pytest.fixture
def client(echo: EchoServer) -> openai.OpenAI:
    echo.engine.replies.clear()
    return echo.client()


def http(echo: EchoServer, key: str = USER_KEY) -> httpx.Client:
    return httpx.Client(base_url=echo.url, headers={"authorization": f"Bearer {key}"}, timeout=120)


def ask(client: openai.OpenAI, question: str, model: str = "support", **extra: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **extra)


def test_stored_with_metadata_and_listed_back_in_openais_shape(client: openai.OpenAI) -> None:
    made = [ask(client, f"question {i}", store=True, metadata={"run": "list-test", "parity": str(i % 2)})
            for i in range(5)]
    ask(client, "not stored")
    page = client.chat.completions.list(metadata={"run": "list-test"}, limit=2)
    assert [c.id for c in page.data] == [made[0].id, made[1].id] and page.has_more
    everything = [c.id for c in client.chat.completions.list(metadata={"run": "list-test"}, limit=2)]  # auto-paging
    assert everything == [c.id for c in made]
    odd = client.chat.completions.list(metadata={"run": "list-test", "parity": "1"}, order="desc")
    assert [c.id for c in odd.data] == [made[3].id, made[1].id]
    assert not client.chat.completions.list(metadata={"run": "list-test"}, model="logged").data
    stored = client.chat.completions.retrieve(made[2].id)
    assert stored.choices[0].message.content == made[2].choices[0].message.content == "echo: question 2"
    assert stored.metadata == {"run": "list-test", "parity": "0"} and stored.model == "support"
    assert stored.usage.completion_tokens == made[2].usage.completion_tokens
    extras = stored.model_extra["lorag"]
    assert extras["domain"] == "support" and extras["request_id"] == made[2].id
    messages = client.chat.completions.messages.list(made[2].id)
    assert [(m.id, m.role, m.content) for m in messages.data] == [(f"{made[2].id}-0", "user", "question 2")]


def test_metadata_is_updated_only_and_a_deleted_completion_is_gone(client: openai.OpenAI) -> None:
    made = ask(client, "to be deleted", store=True, metadata={"stage": "draft"})
    updated = client.chat.completions.update(made.id, metadata={"stage": "final"})
    assert updated.metadata == {"stage": "final"} and updated.choices[0].message.content == "echo: to be deleted"
    deleted = client.chat.completions.delete(made.id)
    assert deleted.deleted and deleted.id == made.id and deleted.object == "chat.completion.deleted"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.delete(made.id)


def test_metadata_without_store_is_refused_as_openai_does(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, "hi", metadata={"a": "b"})
    assert refused.value.body["param"] == "metadata" and "store" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_many:
        ask(client, "hi", store=True, metadata={f"k{i}": "v" for i in range(17)})
    assert "16" in too_many.value.body["message"]


def test_a_stream_is_stored_as_the_response_it_equals(client: openai.OpenAI) -> None:
    chunks = list(ask(client, "streamed answer", store=True, stream=True, metadata={"run": "stream"}))
    completion_id = chunks[0].id
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    stored = client.chat.completions.retrieve(completion_id)
    assert stored.object == "chat.completion" and stored.choices[0].message.content == text == "echo: streamed answer"
    assert stored.choices[0].finish_reason == "stop" and stored.usage.total_tokens > 0


def test_only_guarded_text_is_stored_a_redacted_question_stays_redacted(echo: EchoServer,
                                                                          client: openai.OpenAI) -> None:
    echo.engine.reply(f"Mail {EMAIL} now.")
    made = ask(client, f"I am {EMAIL}, help", model="redacted", store=True)
    stored = client.chat.completions.retrieve(made.id)
    messages = [m.content for m in client.chat.completions.messages.list(made.id).data]
    assert EMAIL not in str(messages) and "[EMAIL_1]" in messages[0]
    assert stored.choices[0].message.content == made.choices[0].message.content == "Mail [EMAIL_1] now."
    record = echo.app.state.recorder.store.get(made.id, None)
    assert EMAIL not in str(record.context) and EMAIL not in str(record.response)


def test_a_domain_stores_by_default_with_its_own_retention(echo: EchoServer, client: openai.OpenAI) -> None:
    made = ask(client, "kept by the domain", model="logged")
    assert client.chat.completions.retrieve(made.id).metadata == {}
    record = echo.app.state.recorder.store.get(made.id, None)
    assert record.expires_at - record.created == 2 * 86_400 and record.domain == "logged"
    opted_out = ask(client, "not this one", model="logged", store=False)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(opted_out.id)
    echo.app.state.recorder.store.sweep(now=record.expires_at)  # two days later
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(made.id)


def test_a_key_sees_only_its_own_completions_and_an_admin_all(echo: EchoServer, client: openai.OpenAI) -> None:
    mine = ask(client, "mine", store=True, metadata={"run": "keys"})
    other = echo.client(OTHER_TRAINER)
    theirs = ask(other, "theirs", store=True, metadata={"run": "keys"})
    assert [c.id for c in client.chat.completions.list(metadata={"run": "keys"})] == [mine.id]
    assert [c.id for c in other.chat.completions.list(metadata={"run": "keys"})] == [theirs.id]
    for call in (lambda: other.chat.completions.retrieve(mine.id), lambda: other.chat.completions.delete(mine.id),
                 lambda: other.chat.completions.update(mine.id, metadata={"x": "y"}),
                 lambda: other.chat.completions.list(after=mine.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    admin = echo.client(ADMIN_KEY)
    assert {c.id for c in admin.chat.completions.list(metadata={"run": "keys"})} == {mine.id, theirs.id}


def test_ratings_round_trip_and_are_idempotent_per_key(echo: EchoServer, client: openai.OpenAI) -> None:
    made = ask(client, "rate me", store=True)
    with http(echo) as api:
        first = api.post(f"/v1/chat/completions/{made.id}/feedback", json={"thumbs": "down"}).json()
        again = api.post(f"/v1/chat/completions/{made.id}/feedback",
                         json={"score": -0.5, "corrected": "A better answer.", "comment": "too short"}).json()
        assert first["id"] == again["id"] and first["score"] == -1.0
        assert (again["score"], again["corrected"], again["comment"]) == (-0.5, "A better answer.", "too short")
        feedback = api.get(f"/v1/chat/completions/{made.id}/feedback").json()
        assert [r["id"] for r in feedback["ratings"]] == [first["id"]] and feedback["ratings"][0]["score"] == -0.5
        bad = api.post(f"/v1/chat/completions/{made.id}/feedback", json={"score": 2})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "score"
        both = api.post(f"/v1/chat/completions/{made.id}/feedback", json={"score": 1, "thumbs": "up"})
        assert both.status_code == 400
        empty = api.post(f"/v1/chat/completions/{made.id}/feedback", json={})
        assert empty.status_code == 400
    with http(echo, OTHER_TRAINER) as stranger:
        assert stranger.post(f"/v1/chat/completions/{made.id}/feedback", json={"thumbs": "up"}).status_code == 404
    with http(echo, ADMIN_KEY) as admin:  # an admin's rating is its own, beside the owner's
        admin.post(f"/v1/chat/completions/{made.id}/feedback", json={"thumbs": "up"}).raise_for_status()
        assert len(admin.get(f"/v1/chat/completions/{made.id}/feedback").json()["ratings"]) == 2


def test_a_preference_needs_two_answers_to_the_same_prompt(echo: EchoServer, client: openai.OpenAI) -> None:
    echo.engine.reply("Answer one.")
    one = ask(client, "same prompt", store=True)
    echo.engine.reply("Answer two.")
    two = ask(client, "same prompt", store=True)
    elsewhere = ask(client, "another prompt", store=True)
    with http(echo) as api:
        made = api.post("/v1/feedback/preferences", json={"chosen": two.id, "rejected": one.id}).json()
        flipped = api.post("/v1/feedback/preferences",
                           json={"chosen": one.id, "rejected": two.id, "comment": "on reflection"}).json()
        assert made["id"] == flipped["id"] and (flipped["chosen"], flipped["rejected"]) == (one.id, two.id)
        listed = api.get(f"/v1/chat/completions/{two.id}/feedback").json()["preferences"]
        assert [p["id"] for p in listed] == [made["id"]]
        different = api.post("/v1/feedback/preferences", json={"chosen": one.id, "rejected": elsewhere.id})
        assert different.status_code == 400 and "different prompts" in different.json()["error"]["message"]
        same = api.post("/v1/feedback/preferences", json={"chosen": one.id, "rejected": one.id})
        assert same.status_code == 400
    client.chat.completions.delete(two.id)  # deleting a completion takes its feedback with it
    with http(echo) as api:
        assert api.get(f"/v1/chat/completions/{one.id}/feedback").json()["preferences"] == []


def test_a_reused_request_id_keeps_the_first_record_and_loses_no_other(echo: EchoServer) -> None:
    client = echo.client()
    first = ask(client, "first", store=True, extra_headers={"x-request-id": "reused-id"})
    ask(client, "second", store=True, extra_headers={"x-request-id": "reused-id"})
    other = ask(client, "another", store=True)
    assert client.chat.completions.retrieve(first.id).choices[0].message.content == "echo: first"
    assert client.chat.completions.retrieve(other.id).choices[0].message.content == "echo: another"
    store = echo.app.state.recorder.store  # in one batch: the duplicate is left out, the rest is stored
    one, two, clash = store.get(first.id, None), store.get(other.id, None), store.get(other.id, None)
    one.id, two.id, clash.id = "batch-a", "batch-b", first.id  # clash: another answer under a taken id
    assert store.add(one, clash, two) == [first.id]
    assert store.get("batch-a", None).answer() == store.get("batch-b", None).answer().replace("another", "first")
