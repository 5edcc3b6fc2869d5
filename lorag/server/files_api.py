"""OpenAI's Files API: /v1/files (upload, list, retrieve, content, delete) over lorag.finetune.files.

Uploads are parsed here with python-multipart's streaming parser, not Starlette's form parser:
that one spools each file to a temporary file (in memory up to 1 MiB, then in the system temp
dir, which may be a tmpfs, i.e. memory again) before the route sees a byte, so a 512 MB upload
would be written twice and could sit in RAM. Here the file part's bytes go straight from the
socket into the store's partial folder, a MiB at a time, whatever order the parts come in
(the Python SDK sends `purpose` before `file`; other clients may send it after).

Every route needs the fine_tune scope (or an admin key): files exist to train on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, BinaryIO, Literal, NamedTuple
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from lorag.errors import LoragError
from lorag.finetune.files import FileStore, Staged, check_expiry, check_purpose, not_found
from lorag.server.auth import Principal, require_fine_tune
from lorag.server.pagination import check_limit

router = APIRouter()
FineTuner = Annotated[Principal, Depends(require_fine_tune)]
MAX_LIST = 10_000
MAX_FIELD_BYTES = 64 << 10  # purpose, expires_after[...]: short strings; anything longer is refused
MAX_FIELDS = 32
READ_BYTES = 1 << 20
UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["fine-tune"]},
                   "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                   "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000}}}}}}}


def files_of(request: Request) -> FileStore:
    store: FileStore = request.app.state.files
    return store


class Event(NamedTuple):
    """One step of a multipart body: a whole field, a file part's start, some of its bytes, or its end."""

    kind: Literal["field", "file", "data", "file_end"]
    name: str = ""
    value: str = ""
    data: bytes = b""


class Parts:
    """python-multipart's callbacks, gathered as Events for the route to read after each body chunk."""

    def __init__(self, content_type: str) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise LoragError("POST /v1/files takes multipart/form-data with a `file` and a `purpose`.",
                             param="file", code="invalid_value")
        self.events: list[Event] = []
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field: bytearray = bytearray()
        self._name = b""
        self._value = b""
        self._part: tuple[str, bool] = ("", False)  # name, is the file
        self._fields = 0
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._header_name, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
            "on_end": self._all_done,
        })

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse one chunk of the body; the events it completed."""
        try:
            self.parser.write(chunk)
        except FormParserError:
            raise LoragError("The multipart body is malformed.", param="file", code="invalid_value") from None
        events, self.events = self.events, []
        return events

    def _begin(self) -> None:
        self._headers, self._field, self._name, self._value = {}, bytearray(), b"", b""

    def _header_name(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name, self._value = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode(errors="replace")
        is_file = name == "file"
        if b"filename" in options and not is_file:
            raise LoragError(f"Unexpected file part {name!r}: send one file, as the part named 'file'.",
                             param="file", code="invalid_value")
        if not is_file:
            self._fields += 1
            if self._fields > MAX_FIELDS:
                raise LoragError("Too many form fields.", code="invalid_value")
        self._part = (name, is_file)
        if is_file:
            filename = options.get(b"filename", b"file").decode(errors="replace")
            self.events.append(Event("file", name=filename))

    def _data(self, data: bytes, start: int, end: int) -> None:
        name, is_file = self._part
        if is_file:
            self.events.append(Event("data", data=data[start:end]))
            return
        self._field += data[start:end]
        if len(self._field) > MAX_FIELD_BYTES:
            raise LoragError(f"The form field {name!r} is too long.", param=name, code="invalid_value")

    def _end(self) -> None:
        name, is_file = self._part
        if is_file:
            self.events.append(Event("file_end"))
        else:
            self.events.append(Event("field", name=name, value=self._field.decode(errors="replace")))

    def _all_done(self) -> None:
        self.ended = True


async def body_events(parts: Parts, body: AsyncIterator[bytes]) -> AsyncIterator[Event]:
    """The request body as Events; a body that stops before its closing boundary is refused."""
    async for chunk in body:
        for event in parts.feed(chunk):
            yield event
    if not parts.ended:
        raise LoragError("The multipart body ended early (before its closing boundary).", param="file",
                         code="invalid_value")


async def file_bytes(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """The current file part's bytes, up to its end (the events after it stay for the caller)."""
    async for event in events:
        if event.kind == "file_end":
            return
        if event.kind == "data":
            yield event.data


def expires_after(fields: dict[str, str]) -> int | None:
    """`expires_after[anchor]` and `expires_after[seconds]`, as the openai SDK sends them (or neither)."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise LoragError("expires_after.anchor must be 'created_at'.", param="expires_after.anchor",
                         code="invalid_value")
    try:
        value = int(seconds or "")
    except ValueError:
        raise LoragError("expires_after.seconds must be a whole number of seconds.", param="expires_after.seconds",
                         code="invalid_value") from None
    return check_expiry(value)


@router.post("/v1/files", openapi_extra=UPLOAD_SCHEMA)
async def create_file(request: Request, principal: FineTuner) -> dict[str, Any]:
    """Upload one file (multipart: file, purpose, optional expires_after[anchor] and [seconds])."""
    store = files_of(request)
    body = request.stream()
    events = body_events(Parts(request.headers.get("content-type", "")), body)
    fields: dict[str, str] = {}
    staged: Staged | None = None
    filename = "file"
    try:
        try:
            async for event in events:
                if event.kind == "field":
                    fields[event.name] = event.value
                elif event.kind == "file":
                    if staged is not None:
                        raise LoragError("Send one file per upload.", param="file", code="invalid_value")
                    if "purpose" in fields:  # known already (the SDK sends it first): refuse before the bytes
                        check_purpose(fields["purpose"])
                    expires_after(fields)
                    filename = event.name
                    staged = await store.stage(file_bytes(events))
        except LoragError:
            await drain(body)  # so the client, still sending, reads the error rather than a reset connection
            raise
        except ClientDisconnect:
            raise LoragError("The upload stopped before its end.", param="file", code="upload_incomplete") from None
        if staged is None:
            raise LoragError("Missing the `file` part.", param="file", code="invalid_value")
        if "purpose" not in fields:
            raise LoragError("Missing `purpose` (this server accepts 'fine-tune').", param="purpose",
                             code="invalid_value")
        expires = expires_after(fields)
        committing, staged = staged, None  # from here commit discards it itself on failure
        return await asyncio.to_thread(store.commit, committing, filename=filename, purpose=fields["purpose"],
                                       owner=principal.key_id, expires_after_s=expires)
    finally:
        if staged is not None:
            store.discard(staged)


async def drain(body: AsyncIterator[bytes]) -> None:
    """Read and drop what is left of the body (bounded by the server's upload ceiling)."""
    with contextlib.suppress(ClientDisconnect, RuntimeError):
        async for _ in body:
            pass


@router.get("/v1/files")
def list_files(
    request: Request,
    principal: FineTuner,
    purpose: str | None = None,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    limit: Annotated[int, Query(description="1 to 10000.")] = MAX_LIST,
) -> dict[str, Any]:
    """The caller's files (an admin's: everyone's), newest first unless order=asc."""
    return files_of(request).list(principal, purpose=purpose, order=order, after=after,
                                  limit=check_limit(limit, MAX_LIST))


@router.get("/v1/files/{file_id}")
def retrieve_file(file_id: str, request: Request, principal: FineTuner) -> dict[str, Any]:
    return files_of(request).get(file_id, principal)


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, request: Request, principal: FineTuner) -> StreamingResponse:
    """The bytes as uploaded; the file is opened here, so a delete meanwhile cannot cut the answer short."""
    store = files_of(request)
    meta = store.get(file_id, principal)
    try:
        handle = store.path_of(file_id, principal).open("rb")
    except FileNotFoundError:
        raise not_found(file_id) from None
    size = os.fstat(handle.fileno()).st_size
    disposition = f"attachment; filename*=utf-8''{quote(meta['filename'], safe='')}"
    return StreamingResponse(read_chunks(handle), media_type="application/octet-stream",
                             headers={"content-length": str(size), "content-disposition": disposition})


def read_chunks(handle: BinaryIO) -> Iterator[bytes]:
    """A sync generator: Starlette runs it in its thread pool, off the event loop."""
    with handle:
        while chunk := handle.read(READ_BYTES):
            yield chunk


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, request: Request, principal: FineTuner) -> dict[str, Any]:
    return files_of(request).delete(file_id, principal)
