"""The Files API (/v1/files) through the official `openai` client over real HTTP, and the store beneath it.

The server is the echo server (tests/echo_server.py): no engine is needed to store files. Expiry is
tested by moving the store's clock, crash safety by uploads whose byte source fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lorag.errors import LoragError, NotFoundError
from lorag.finetune.files import STALE_PARTIAL_S, FileStore, FileTooLarge
from lorag.server.auth import key_id
from lorag.server.keys import hash_secret
from lorag.serving.principal import Principal
from tests.echo_server import (
    ADMIN_KEY,
    OTHER_TRAINER,
    TRAINER,
    USER_KEY,
    EchoServer,
    echo_server,
    echo_settings,
    trainer_keys,
)

MAX_FILE_BYTES = 4096
JSONL = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 3


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    settings = echo_settings(tmp_path_factory.mktemp("files"), server={"api_keys": trainer_keys()},
                             fine_tuning={"max_file_bytes": MAX_FILE_BYTES})
    with echo_server(settings) as server:
        yield server


@pytest.fixture
def store(echo: EchoServer) -> Iterator[FileStore]:
    """The server's store, emptied before each test; its clock put back after."""
    files: FileStore = echo.app.state.files
    shutil.rmtree(files.root, ignore_errors=True)
    clock = files.clock
    yield files
    files.clock = clock


def on_disk(files: FileStore) -> list[str]:
    """Every entry under the files folder, partial and hidden ones included."""
    return sorted(os.listdir(files.root)) if files.root.exists() else []


def upload(client: openai.OpenAI, name: str = "train.jsonl", data: bytes = JSONL, **options: object) -> str:
    return client.files.create(file=(name, data), purpose="fine-tune", **options).id  # type: ignore[arg-type]


def test_upload_retrieve_list_content_delete(echo: EchoServer, store: FileStore) -> None:
    client = echo.client(TRAINER)
    created = client.files.create(file=("train.jsonl", JSONL), purpose="fine-tune")
    assert created.id.startswith("file-") and len(created.id) == len("file-") + 24
    assert (created.object, created.bytes, created.filename, created.purpose) == ("file", len(JSONL), "train.jsonl",
                                                                                  "fine-tune")
    assert created.status == "processed" and created.expires_at is None and created.status_details is None
    assert client.files.retrieve(created.id) == created
    assert [f.id for f in client.files.list()] == [created.id]
    assert client.files.content(created.id).read() == JSONL
    assert on_disk(store) == [created.id]
    assert sorted(os.listdir(store.root / created.id)) == ["content", "meta.json"]
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError) as gone:
        client.files.retrieve(created.id)
    assert gone.value.code == "file_not_found" and gone.value.body["param"] == "file_id"  # type: ignore[index]
    assert on_disk(store) == [] and list(client.files.list()) == []


def test_list_pages_with_after_and_limit_filters_by_purpose_and_orders(echo: EchoServer, store: FileStore) -> None:
    client = echo.client(TRAINER)
    ids = [upload(client, f"part-{i}.jsonl") for i in range(5)]
    first = client.files.list(order="asc", limit=2)
    assert [f.id for f in first.data] == ids[:2] and first.has_more
    assert [f.id for f in client.files.list(order="asc", limit=2, after=ids[1]).data] == ids[2:4]
    last = client.files.list(order="asc", limit=2, after=ids[3])
    assert [f.id for f in last.data] == ids[4:] and not last.has_more
    assert [f.id for f in client.files.list(order="asc", limit=2)] == ids  # the SDK follows the cursor itself
    assert [f.id for f in client.files.list()] == ids[::-1]  # newest first by default
    raw = httpx.get(f"{echo.api}/files", params={"limit": 2}, headers={"authorization": f"Bearer {TRAINER}"}).json()
    assert (raw["object"], raw["first_id"], raw["last_id"], raw["has_more"]) == ("list", ids[4], ids[3], True)

    results = store.add_bytes(b"step,loss\n1,0.5\n", filename="step_metrics.csv", purpose="fine-tune-results",
                              owner=key_id(hash_secret(TRAINER)))
    assert [f.id for f in client.files.list(purpose="fine-tune-results")] == [results["id"]]
    assert results["id"] not in {f.id for f in client.files.list(purpose="fine-tune")}
    assert client.files.retrieve(results["id"]).purpose == "fine-tune-results"

    with pytest.raises(openai.NotFoundError) as unknown:
        client.files.list(after="file-" + "0" * 24)
    assert unknown.value.body["param"] == "after"  # type: ignore[index]
    for limit in (0, 10_001):
        with pytest.raises(openai.BadRequestError) as bad:
            client.files.list(limit=limit)
        assert bad.value.body["param"] == "limit"  # type: ignore[index]


def test_a_key_sees_only_its_own_files_and_an_admin_sees_all(echo: EchoServer, store: FileStore) -> None:
    mine, theirs, admin = echo.client(TRAINER), echo.client(OTHER_TRAINER), echo.client(ADMIN_KEY)
    file_id = upload(mine)
    missing = "file-" + "f" * 24
    for call in (theirs.files.retrieve, theirs.files.content, theirs.files.delete):
        with pytest.raises(openai.NotFoundError) as hidden:
            call(file_id)
        with pytest.raises(openai.NotFoundError) as absent:
            call(missing)
        # Another key's file and no file at all look the same: its existence is not told.
        told, untold = hidden.value.body, absent.value.body
        assert told == {**untold, "message": untold["message"].replace(missing, file_id)}  # type: ignore[index,dict-item]
    assert list(theirs.files.list()) == []
    other_id = upload(theirs)
    assert [f.id for f in mine.files.list()] == [file_id]
    assert {f.id for f in admin.files.list()} == {file_id, other_id}
    assert admin.files.retrieve(file_id).id == file_id and admin.files.content(file_id).read() == JSONL
    assert admin.files.delete(other_id).deleted
    assert mine.files.retrieve(file_id).id == file_id  # untouched by the other key's tries


def test_a_key_without_the_fine_tune_scope_is_refused(echo: EchoServer, store: FileStore) -> None:
    client = echo.client(USER_KEY)
    for call in (lambda: client.files.list(), lambda: upload(client),
                 lambda: client.files.retrieve("file-" + "0" * 24)):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            call()
        assert "fine_tune scope" in refused.value.message and "--fine-tune" in refused.value.message
    assert on_disk(store) == []


def test_an_upload_past_the_ceiling_is_413_and_leaves_nothing(echo: EchoServer, store: FileStore) -> None:
    client = echo.client(TRAINER)
    with pytest.raises(openai.APIStatusError) as too_large:
        upload(client, data=b"x" * (MAX_FILE_BYTES + 1))
    assert too_large.value.status_code == 413 and too_large.value.code == "file_too_large"
    # Far more than the socket buffers hold: the rest is read and dropped, so the client still gets the 413.
    with pytest.raises(openai.APIStatusError) as much_too_large:
        upload(client, data=b"x" * (8 << 20))
    assert much_too_large.value.status_code == 413 and much_too_large.value.code == "file_too_large"
    assert on_disk(store) == []
    assert client.files.retrieve(upload(client, data=b"x" * MAX_FILE_BYTES)).bytes == MAX_FILE_BYTES  # exactly fits


def test_purposes_other_than_fine_tune_are_refused(echo: EchoServer, store: FileStore) -> None:
    client = echo.client(TRAINER)
    for purpose in ("assistants", "batch", "fine-tune-results", "nonsense"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(file=("a.jsonl", JSONL), purpose=purpose)  # type: ignore[arg-type]
        assert refused.value.body["param"] == "purpose" and "'fine-tune'" in refused.value.message  # type: ignore[index]
    assert on_disk(store) == []


def test_parts_in_any_order_and_malformed_bodies(echo: EchoServer, store: FileStore) -> None:
    """A file part before `purpose` works (clients differ); a body cut short or without a file stores nothing."""
    boundary = "b0undary"

    def body(*parts: tuple[str, str | None, bytes], end: bool = True) -> bytes:
        out = b""
        for name, filename, data in parts:
            disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
            out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
        return out + (f"--{boundary}--\r\n".encode() if end else b"")

    headers = {"authorization": f"Bearer {TRAINER}", "content-type": f"multipart/form-data; boundary={boundary}"}
    file_part = ("file", "late.jsonl", JSONL)
    late = httpx.post(f"{echo.api}/files", headers=headers, content=body(file_part, ("purpose", None, b"fine-tune")))
    assert late.status_code == 200 and late.json()["filename"] == "late.jsonl", late.text
    for bad in (body(file_part, ("purpose", None, b"batch")), body(("purpose", None, b"fine-tune")),
                body(("purpose", None, b"fine-tune"), file_part, end=False), body(file_part),
                body(("purpose", None, b"fine-tune"), file_part, ("extra", "x.bin", b"x"))):
        refused = httpx.post(f"{echo.api}/files", headers=headers, content=bad)
        assert refused.status_code == 400 and set(refused.json()["error"]) == {"message", "type", "param", "code"}
    not_multipart = httpx.post(f"{echo.api}/files", headers={"authorization": f"Bearer {TRAINER}"}, json={})
    assert not_multipart.status_code == 400
    assert on_disk(store) == [late.json()["id"]]


def test_expires_after_is_kept_and_an_expired_file_is_gone(echo: EchoServer, store: FileStore) -> None:
    client = echo.client(TRAINER)
    kept = upload(client, "kept.jsonl")
    created = client.files.create(file=("brief.jsonl", JSONL), purpose="fine-tune",
                                  expires_after={"anchor": "created_at", "seconds": 3600})
    assert created.expires_at == created.created_at + 3600
    store.clock = lambda: created.created_at + 3599.0
    assert client.files.retrieve(created.id).id == created.id
    store.clock = lambda: created.created_at + 3600.0
    assert [f.id for f in client.files.list()] == [kept]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    assert on_disk(store) == [kept]
    for expires, param in (({"anchor": "created_at", "seconds": 60}, "expires_after.seconds"),
                           ({"anchor": "created_at", "seconds": 2_592_001}, "expires_after.seconds"),
                           ({"anchor": "last_active_at", "seconds": 3600}, "expires_after.anchor")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(file=("a.jsonl", JSONL), purpose="fine-tune", expires_after=expires)  # type: ignore[arg-type]
        assert refused.value.body["param"] == param  # type: ignore[index]
    assert on_disk(store) == [kept]


# -- the store alone -------------------------------------------------------------------------

OWNER = Principal(name="owner", admin=False, fine_tune=True, key_id="key-owner")
ADMIN = Principal(name="ops", admin=True, key_id="key-ops")


def listed(files: FileStore, who: Principal = ADMIN) -> list[str]:
    return [f["id"] for f in files.list(who, purpose=None, order="asc", after=None, limit=100)["data"]]


async def failing(after: int) -> AsyncIterator[bytes]:
    for _ in range(after):
        yield b"x" * 100
    raise ConnectionResetError("the client went away")


def test_a_crash_mid_upload_leaves_nothing(tmp_path: Path) -> None:
    files = FileStore(tmp_path, max_bytes=10_000)
    with pytest.raises(ConnectionResetError):
        asyncio.run(files.upload(failing(3), filename="a.jsonl", purpose="fine-tune", owner="key-owner",
                                 expires_after_s=None))
    with pytest.raises(FileTooLarge):
        asyncio.run(files.upload(failing(200), filename="a.jsonl", purpose="fine-tune", owner="key-owner",
                                 expires_after_s=None))

    async def cancelled() -> None:
        started = asyncio.Event()

        async def stalls() -> AsyncIterator[bytes]:
            yield b"x" * 100
            started.set()
            await asyncio.Event().wait()  # never ends: the task is cancelled here
            yield b""

        task = asyncio.create_task(files.upload(stalls(), filename="a", purpose="fine-tune", owner="o",
                                                expires_after_s=None))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert listed(files) == [] and os.listdir(files.root) == []


def test_a_partial_left_by_a_killed_process_is_never_listed_and_swept_when_stale(tmp_path: Path) -> None:
    files = FileStore(tmp_path, max_bytes=10_000)

    async def stage_only() -> None:
        async def data() -> AsyncIterator[bytes]:
            yield b"half a file"

        await files.stage(data())  # then the process "dies": never committed, never discarded

    asyncio.run(stage_only())
    [partial] = os.listdir(files.root)
    assert partial.startswith(".file-") and partial.endswith(".partial")
    assert listed(files) == [] and files.sweep() == 0 and os.listdir(files.root) == [partial]  # maybe still writing
    old = time.time() - STALE_PARTIAL_S - 60
    for path in (files.root / partial, files.root / partial / "content"):
        os.utime(path, (old, old))
    assert files.sweep() == 0 and os.listdir(files.root) == []


def test_store_ownership_expiry_and_server_made_files(tmp_path: Path) -> None:
    now = [1_000_000.0]
    files = FileStore(tmp_path, max_bytes=100, clock=lambda: now[0])
    stranger = Principal(name="stranger", admin=False, fine_tune=True, key_id="key-stranger")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"abc"

    brief = asyncio.run(files.upload(chunks(), filename="../../etc/a.jsonl", purpose="fine-tune",
                                     owner=OWNER.key_id, expires_after_s=3600))
    assert brief["filename"] == "a.jsonl" and brief["expires_at"] == 1_000_000 + 3600 and "owner" not in brief
    results = files.add_bytes(b"step,loss\n", filename="results.csv", purpose="fine-tune-results", owner="key-owner")
    assert files.owner_of(brief["id"]) == "key-owner" and files.owner_of("file-" + "0" * 24) is None
    assert files.path_of(results["id"], OWNER).read_bytes() == b"step,loss\n"
    for call in (files.get, files.path_of, files.delete):
        with pytest.raises(NotFoundError) as hidden:
            call(brief["id"], stranger)
        assert hidden.value.code == "file_not_found" and hidden.value.param == "file_id"
    with pytest.raises(NotFoundError):
        files.get("../keys.json", ADMIN)  # not an id: never a path
    with pytest.raises(LoragError, match="fine-tune"):
        files.add_bytes(b"x", filename="x", purpose="batch", owner="o")
    with pytest.raises(FileTooLarge):
        files.add_bytes(b"x" * 101, filename="x", purpose="fine-tune", owner="o")
    with pytest.raises(LoragError) as bad_expiry:
        asyncio.run(files.upload(chunks(), filename="a", purpose="fine-tune", owner="o", expires_after_s=60))
    assert bad_expiry.value.param == "expires_after.seconds"
    assert listed(files, OWNER) == [brief["id"], results["id"]] and listed(files, stranger) == []
    now[0] += 3600
    assert files.owner_of(brief["id"]) is None and files.sweep() == 1 and listed(files) == [results["id"]]
    assert files.delete(results["id"], OWNER) == {"id": results["id"], "object": "file", "deleted": True}
    assert listed(files) == [] and os.listdir(files.root) == []
