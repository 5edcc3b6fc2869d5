"""HTTP routes for knowledge bases: list, show and query for API keys; writes for admins.

The server includes `router` and sets `app.state.knowledge`, the pipeline's own link
(lorag.knowledge.link), so a document ingested through these routes is searchable by the next request,
without a restart. Handlers are plain functions: FastAPI runs them in its thread
pool, off the event loop, because embedding and Chroma calls block.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from lorag.errors import LoragError
from lorag.knowledge.errors import IngestInputError, PayloadTooLarge
from lorag.knowledge.ingest import IngestReport
from lorag.knowledge.link import KnowledgeLink
from lorag.knowledge.service import UPLOAD_PREFIX, KnowledgeService
from lorag.knowledge.source_files import SourceFile
from lorag.server.auth import Principal, require_admin, require_knowledge
from lorag.serving.domains import DomainCatalog

router = APIRouter(tags=["knowledge"])
KeyHolder = Annotated[Principal, Depends(require_knowledge)]  # keys with the knowledge scope
Admin = Annotated[Principal, Depends(require_admin)]


def get_service(request: Request) -> KnowledgeService:
    """The app's knowledge service (the pipeline's link), opened on first use; a failure is retried next request."""
    link: KnowledgeLink = request.app.state.knowledge
    return link.get()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueryRequest(_Body):
    query: str
    top_k: int | None = Field(default=None, ge=1, le=1000)
    mode: Literal["vector", "keyword", "hybrid"] | None = None
    filters: dict[str, Any] | None = None
    score_threshold: float | None = None
    rerank: bool | None = None


class JudgedRequest(_Body):
    """A judged set as file contents: BEIR's queries.jsonl and qrels TSV."""

    queries: str = Field(min_length=1)
    qrels: str = Field(min_length=1)
    depth: int = Field(default=200, ge=10, le=10000)
    allow_unknown_docs: bool = False


class EvalRequest(JudgedRequest):
    modes: list[Literal["vector", "keyword", "hybrid", "hybrid+rerank"]] | None = None


class TuneRequest(JudgedRequest):
    held_out: float = Field(default=0.3, ge=0.05, le=0.8)
    method: Literal["convex", "rrf"] | None = None
    dry_run: bool = False


class CreateRequest(_Body):
    name: str
    description: str = ""


class IngestPathsRequest(_Body):
    paths: list[str] = Field(min_length=1)
    recursive: bool = True
    sync: bool = False
    create: bool = False
    corpus: bool = False  # .jsonl files as corpora: one document per record
    id_field: str = "_id"


@router.get("/v1/knowledge")
def list_knowledge(request: Request, principal: KeyHolder) -> dict[str, Any]:
    """The bases this key may read (a domain-scoped key sees its domains' bases)."""
    bases = [b for b in get_service(request).list_bases() if _visible(request, principal, [b["name"]])]
    return {"object": "list", "data": bases}


@router.get("/v1/knowledge/{kb}")
def show_knowledge(kb: str, request: Request, principal: KeyHolder) -> dict[str, Any]:
    _check_visible(request, principal, [kb])
    return get_service(request).show(kb)


@router.post("/v1/knowledge/{kb}/query")
def query_knowledge(
    kb: str, body: QueryRequest, request: Request, principal: KeyHolder
) -> dict[str, Any]:
    """Hits shaped like `lorag kb query --json`; `kb` may name several bases, comma-separated."""
    names = [name for name in kb.split(",") if name]
    _check_visible(request, principal, names)
    hits = get_service(request).query(
        names,
        body.query,
        top_k=body.top_k,
        mode=body.mode,
        filters=body.filters,
        score_threshold=body.score_threshold,
        rerank=body.rerank,
    )
    return {"hits": [hit.to_dict() for hit in hits]}


@router.post("/v1/knowledge/{kb}/eval")
def eval_knowledge(kb: str, body: EvalRequest, request: Request, _: Admin) -> dict[str, Any]:
    """`lorag kb eval --json` over HTTP: nDCG@10, recall@100 and MRR@10 per mode."""
    from lorag.knowledge.evaluate import evaluate

    service = get_service(request)
    judged = _judged(service, kb, body)
    return evaluate(service, kb, judged, depth=body.depth, modes=body.modes)


@router.post("/v1/knowledge/{kb}/tune")
def tune_knowledge(kb: str, body: TuneRequest, request: Request, _: Admin) -> dict[str, Any]:
    """`lorag kb tune --json` over HTTP: fit the base's fusion weights, report held-out scores, store."""
    from lorag.knowledge.tune import tune

    service = get_service(request)
    judged = _judged(service, kb, body)
    return tune(service, kb, judged, held_out=body.held_out, depth=body.depth, method=body.method, store=not body.dry_run)


def _judged(service: KnowledgeService, kb: str, body: JudgedRequest) -> Any:
    from lorag.knowledge.evaluate import document_refs
    from lorag.knowledge.judged import load

    return load(
        body.queries, body.qrels, documents=document_refs(service, kb), allow_unknown_documents=body.allow_unknown_docs,
        queries_label="queries", qrels_label="qrels",
    )


@router.post("/v1/knowledge", status_code=201)
def create_knowledge(body: CreateRequest, request: Request, _: Admin) -> dict[str, Any]:
    return get_service(request).create(body.name, body.description)


@router.delete("/v1/knowledge/{kb}")
def drop_knowledge(kb: str, request: Request, _: Admin) -> dict[str, Any]:
    get_service(request).drop(kb)
    return {"name": kb, "deleted": True}


@router.post("/v1/knowledge/{kb}/documents")
def upload_documents(
    kb: str,
    request: Request,
    files: Annotated[list[UploadFile], File()],
    _: Admin,
    create: Annotated[bool, Form()] = False,
) -> dict[str, Any]:
    """Ingest uploaded files; each becomes the document `upload:<filename>` (re-uploading replaces it)."""
    service = get_service(request)
    limit = service.settings.ingest.max_upload_bytes
    sources: list[SourceFile] = []
    refused: list[dict[str, str]] = []
    for upload in files:
        name = _upload_name(upload.filename)
        data = upload.file.read(limit + 1)
        if len(data) > limit:
            refused.append({"source": UPLOAD_PREFIX + name, "reason": f"too large: over {limit} bytes (knowledge.ingest.max_upload_bytes)", "kind": "too_large"})
            continue
        sources.append(SourceFile(source=UPLOAD_PREFIX + name, name=name, data=data, origin="upload"))
    if refused and not sources:
        raise PayloadTooLarge("; ".join(f"{r['source']}: {r['reason']}" for r in refused), param="files")
    report = service.ingest_files(kb, sources, create=create)
    return _report(report, refused)


@router.post("/v1/knowledge/{kb}/ingest")
def ingest_paths(
    kb: str, body: IngestPathsRequest, request: Request, _: Admin
) -> dict[str, Any]:
    """Ingest files on the server's own disk, only from under knowledge.ingest.allowed_roots."""
    service = get_service(request)
    roots = service.settings.ingest.allowed_roots
    if not roots:
        raise LoragError(
            "ingesting server-side paths is disabled: set knowledge.ingest.allowed_roots, or upload files",
            param="paths",
            code="path_not_allowed",
        )
    report = service.ingest_paths(
        kb, body.paths, recursive=body.recursive, sync=body.sync, allowed_roots=roots, create=body.create,
        corpus=body.corpus or body.id_field != "_id", id_field=body.id_field,
    )
    return _report(report, [])


@router.delete("/v1/knowledge/{kb}/documents")
def remove_documents(
    kb: str,
    request: Request,
    _: Admin,
    source: Annotated[list[str], Query(description="Source of a document (repeatable).")],
) -> dict[str, Any]:
    return get_service(request).remove(kb, source).to_dict()


def _domains(request: Request) -> DomainCatalog:
    """The server's domain catalog (an app without the request path builds one from its settings)."""
    pipeline = getattr(request.app.state, "pipeline", None)
    if pipeline is not None:
        return pipeline.domains  # type: ignore[no-any-return]
    catalog: DomainCatalog | None = getattr(request.app.state, "domains", None)
    if catalog is None:
        catalog = request.app.state.domains = DomainCatalog(request.app.state.settings)
    return catalog


def _visible(request: Request, principal: Principal, kbs: list[str]) -> bool:
    catalog = _domains(request)
    return all(catalog.kb_visible(principal, kb) for kb in kbs)


def _check_visible(request: Request, principal: Principal, kbs: list[str]) -> None:
    """403 before any lookup, so a scoped key cannot even learn which other bases exist."""
    _domains(request).check_kbs(principal, kbs)


def _upload_name(filename: str | None) -> str:
    name = (filename or "").replace("\\", "/").strip().lstrip("/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise IngestInputError(f"unusable upload file name {filename!r}", param="files")
    return "/".join(parts)


def _report(report: IngestReport, refused: list[dict[str, str]]) -> dict[str, Any]:
    result = report.to_dict()
    result["skipped"] = refused + result["skipped"]
    result["failed"] = len(refused) + len(report.failed)
    return result
