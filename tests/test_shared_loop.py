"""Stored completions and feedback shared by lorag replicas through a real PostgreSQL server.

Two real lorag apps (the echo engine) on one database ([state] backend = "postgres"): what one
replica stored, rated or deleted, the other reads, lists and sees gone. Then a representative
part of tests/test_stored_completions.py again, on a replica with the PostgreSQL backend (the
API must answer the same on both); a lost connection and an outage; and `lorag state migrate`
moving a loop.sqlite3 in once.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest

from lorag.loop.completions import CompletionStore, StoredCompletion
from lorag.loop.database import loop_database
from lorag.loop.database_pg import PostgresDatabase
from lorag.loop.derived import files_from, record_derived
from lorag.loop.feedback import FeedbackStore
from lorag.server.state_cli import import_loop
from tests import test_stored_completions as stored
from tests.echo_server import USER_KEY, EchoServer, echo_server, echo_settings, trainer_keys
from tests.postgres_server import PostgresServer

pytestmark = pytest.mark.timeout(600)
WAIT_S = 30  # how long a replica may take to see another's write (the recorder batches for 50 ms)
T = TypeVar("T")


@contextlib.contextmanager
def replicas(tmp_path: Path, url: str, count: int = 2) -> Iterator[list[EchoServer]]:
    state = {"backend": "postgres", "url": url}
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(echo_server(echo_settings(tmp_path / f"replica-{i}", state=state)))
               for i in range(count)]


def eventually(read: Callable[[], T]) -> T:
    """`read()` once it stops raising NotFoundError (the writer's batch not committed yet), else its error."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return read()
        except openai.NotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def feedback_of(replica: EchoServer, completion_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{replica.url}/v1/chat/completions/{completion_id}/feedback", timeout=60,
                       headers={"authorization": f"Bearer {USER_KEY}"})
    answer.raise_for_status()
    found: dict[str, Any] = answer.json()
    return found


def test_what_one_replica_stores_another_reads_rates_and_sees_deleted(tmp_path: Path,
                                                                       postgres: PostgresServer) -> None:
    with replicas(tmp_path, postgres.database("loop_everywhere")) as (a, b):
        via_a, via_b = a.client(), b.client()
        a.engine.reply("Answer one.", "Answer two.")
        made = [via_a.chat.completions.create(model="echo-base", messages=[{"role": "user", "content": "same"}],
                                              store=True, metadata={"run": "shared"}) for _ in range(2)]
        one, two = made
        seen = eventually(lambda: via_b.chat.completions.retrieve(two.id))
        assert seen.choices[0].message.content == "Answer two." and seen.metadata == {"run": "shared"}
        assert [c.id for c in via_b.chat.completions.list(metadata={"run": "shared"})] == [one.id, two.id]
        assert [c.id for c in via_b.chat.completions.list(metadata={"run": "shared"}, order="desc", limit=1)
                .data] == [two.id]
        messages = via_b.chat.completions.messages.list(one.id)
        assert [(m.role, m.content) for m in messages.data] == [("user", "same")]
        assert via_b.chat.completions.update(one.id, metadata={"run": "shared", "stage": "final"}).metadata[
            "stage"] == "final"
        assert via_a.chat.completions.retrieve(one.id).metadata == {"run": "shared", "stage": "final"}

        with httpx.Client(base_url=b.url, timeout=60, headers={"authorization": f"Bearer {USER_KEY}"}) as api:
            rating = api.post(f"/v1/chat/completions/{one.id}/feedback", json={"thumbs": "up", "comment": "good"})
            preference = api.post("/v1/feedback/preferences", json={"chosen": one.id, "rejected": two.id})
        assert rating.status_code == 200 and preference.status_code == 200, (rating.text, preference.text)
        through_a = feedback_of(a, one.id)
        assert [(r["id"], r["score"], r["comment"]) for r in through_a["ratings"]] == [
            (rating.json()["id"], 1.0, "good")]
        assert [(p["id"], p["chosen"], p["rejected"]) for p in through_a["preferences"]] == [
            (preference.json()["id"], one.id, two.id)]

        assert via_a.chat.completions.delete(two.id).deleted
        with pytest.raises(openai.NotFoundError):
            via_b.chat.completions.retrieve(two.id)
        assert [c.id for c in via_b.chat.completions.list(metadata={"run": "shared"})] == [one.id]
        assert feedback_of(b, one.id)["preferences"] == []  # the preference went with the completion


def ask(client: openai.OpenAI, question: str) -> Any:
    return client.chat.completions.create(model="echo-base", messages=[{"role": "user", "content": question}],
                                          store=True)


def test_a_lost_connection_loses_no_write_and_an_outage_is_a_503(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.database("loop_outage")
    with replicas(tmp_path, url, count=1) as (a,):
        client = a.client()
        before = ask(client, "before")
        assert client.chat.completions.retrieve(before.id).id == before.id
        cut = postgres.sql("SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity "  # waits till gone
                           "WHERE datname = 'loop_outage' AND pid <> pg_backend_pid()")
        assert int(cut) >= 1
        after_cut = ask(client, "the first write on a connection that is gone")
        assert client.chat.completions.retrieve(after_cut.id).id == after_cut.id  # BEGIN went to a fresh one
        postgres.stop()
        try:
            with pytest.raises(openai.InternalServerError) as gone:
                client.chat.completions.retrieve(before.id)
            assert gone.value.status_code == 503 and gone.value.body["code"] == "state_unavailable"
            assert ask(client, "answered, not stored").choices[0].message.content == "echo: answered, not stored"
            with pytest.raises(openai.InternalServerError):  # a read writes the queue first: this write failed
                client.chat.completions.list()
        finally:
            postgres.start()
        assert [c.id for c in client.chat.completions.list()] == [before.id, after_cut.id]


# The same API on the PostgreSQL backend: a representative part of tests/test_stored_completions.py
# (paging and metadata filters, updates and deletes, owner scoping, the expiry sweep, feedback,
# a reused id in a batch), collected here again with this module's `echo`.
test_listed_in_order_with_metadata_filters_on_postgres = stored.test_stored_with_metadata_and_listed_back_in_openais_shape
test_updated_and_deleted_on_postgres = stored.test_metadata_is_updated_only_and_a_deleted_completion_is_gone
test_retention_and_sweep_on_postgres = stored.test_a_domain_stores_by_default_with_its_own_retention
test_owner_scoping_on_postgres = stored.test_a_key_sees_only_its_own_completions_and_an_admin_all
test_ratings_on_postgres = stored.test_ratings_round_trip_and_are_idempotent_per_key
test_preferences_on_postgres = stored.test_a_preference_needs_two_answers_to_the_same_prompt
test_a_reused_id_on_postgres = stored.test_a_reused_request_id_keeps_the_first_record_and_loses_no_other


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[EchoServer]:
    settings = echo_settings(
        tmp_path_factory.mktemp("stored-pg"), server={"api_keys": trainer_keys()},
        state={"backend": "postgres", "url": postgres.database("loop_api")},
        domains={"support": {"system_prompt": "Be kind."}, "logged": {"store": True, "store_retention_days": 2}})
    with echo_server(settings) as server:
        assert type(server.app.state.recorder.store.db) is PostgresDatabase
        yield server


@pytest.fixture
def client(echo: EchoServer) -> openai.OpenAI:
    echo.engine.replies.clear()
    return echo.client()


def record(number: int, owner: str = "app") -> StoredCompletion:
    now = int(time.time())
    return StoredCompletion(id=f"chatcmpl-{number}", owner=owner, created=now, expires_at=now + 86_400,
                            model="echo-base", domain=None, adapter=None, metadata={"n": str(number)},
                            messages=[{"role": "user", "content": "same"}],
                            response={"id": f"chatcmpl-{number}", "choices": [{"index": 0, "message": {
                                "role": "assistant", "content": f"answer {number}"}}]})


def test_state_migrate_moves_a_loop_database_in_once(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.database("loop_migrated")
    files = loop_database(tmp_path / "state")
    completions = CompletionStore(files)
    completions.add(*[record(i) for i in range(3)])
    completions.delete("chatcmpl-1", None)  # a gap in seq: the order must hold anyway
    completions.add(record(3))
    feedback = FeedbackStore(files, completions)
    rating = feedback.rate("chatcmpl-2", "app", viewer=None, score=0.5, corrected="Better.")
    preference = feedback.prefer("chatcmpl-3", "chatcmpl-0", "app", viewer=None)
    record_derived(files, "file-abc", ["chatcmpl-0", "chatcmpl-2"])
    files.close()
    config = tmp_path / "lorag.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[model]\npath = "echo-base"\n'
                      f'[state]\nbackend = "postgres"\nurl = "{url}"\n', encoding="utf-8")
    moved = subprocess.run([sys.executable, "-m", "lorag.cli", "state", "migrate", "--config", str(config)],
                           capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert moved.returncode == 0, moved.stderr
    assert "stored completions: copied from" in moved.stdout
    assert "3 completions, 1 ratings, 1 preferences, 2 derived" in moved.stdout
    again = import_loop(url, tmp_path / "state" / "loop" / "loop.sqlite3")
    assert "not copied" in again and "already has 3 stored completions" in again
    shared = PostgresDatabase(url)
    try:
        copied = CompletionStore(shared)
        assert [r.id for r in copied.page("app")[0]] == ["chatcmpl-0", "chatcmpl-2", "chatcmpl-3"]
        assert copied.get("chatcmpl-3", "app").response == record(3).response
        assert [r.id for r in copied.page("app", metadata={"n": "2"})[0]] == ["chatcmpl-2"]
        moved_feedback = FeedbackStore(shared, copied)
        assert moved_feedback.ratings() == [rating] and moved_feedback.preferences() == [preference]
        assert files_from(shared, "chatcmpl-2") == ["file-abc"]
    finally:
        shared.close()
