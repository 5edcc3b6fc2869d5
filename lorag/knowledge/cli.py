"""`lorag kb`: create, list, show, ingest, remove, query, eval, tune and drop knowledge bases."""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import click

from lorag.cli_options import config_options
from lorag.errors import LoragError
from lorag.knowledge.cli_common import echo_json, fusion_text, knowledge_service


@click.group("kb")
@config_options
def kb_group() -> None:
    """Knowledge bases: Chroma collections of embedded chunks, searched by vector, BM25 or both."""


@kb_group.command("create")
@click.argument("name")
@click.option("--description", default="", help="A line saying what the knowledge base holds.")
@config_options
def create_cmd(name: str, description: str) -> None:
    """Create an empty knowledge base (embedded with the configured model)."""
    with knowledge_service() as service:
        info = service.create(name, description)
    click.echo(f"created knowledge base {name!r} (embedding model {info['embedding_model']})")


@kb_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_options
def list_cmd(as_json: bool) -> None:
    """List knowledge bases with document and chunk counts."""
    with knowledge_service() as service:
        bases = service.list_bases()
    if as_json:
        echo_json({"knowledge_bases": bases})
        return
    if not bases:
        click.echo("no knowledge bases (create one with `lorag kb create NAME`)")
        return
    width = max(len(b["name"]) for b in bases)
    for base in bases:
        click.echo(
            f"{base['name']:<{width}}  {base['documents']:>6} documents  {base['chunks']:>8} chunks  "
            f"{base['embedding_model']}"
        )


@kb_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--documents/--no-documents", default=True, help="List the documents too.")
@config_options
def show_cmd(name: str, as_json: bool, documents: bool) -> None:
    """Show a knowledge base: documents, chunk count, embedding model, size."""
    with knowledge_service() as service:
        info = service.show(name, documents=documents)
    if as_json:
        echo_json(info)
        return
    chunking = info["chunking"]
    click.echo(f"knowledge base   {info['name']}" + (f" - {info['description']}" if info["description"] else ""))
    click.echo(f"documents        {info['documents']}")
    click.echo(f"chunks           {info['chunks']}")
    click.echo(f"size             {_size(info['bytes'])} of source documents")
    click.echo(f"embedding model  {info['embedding_model']} ({info['embedding_dim']} dims)")
    click.echo(f"chunking         {chunking['splitter']}, {chunking['chunk_size']} tokens, overlap {chunking['chunk_overlap']}")
    fusion = info.get("fusion")
    if fusion:
        click.echo(f"hybrid fusion    {fusion_text(fusion)}" + (" (tuned by `kb tune`)" if fusion.get("tuned") else ""))
    click.echo(f"created          {info['created_at']}")
    click.echo(f"store            {info['store']}")
    for doc in info.get("document_list", []):
        click.echo(f"  {doc['chunks']:>5} chunks  {_size(doc['bytes']):>9}  {doc['source']}")


@kb_group.command("ingest")
@click.argument("name")
@click.argument("paths", nargs=-1, required=True)
@click.option("--sync", is_flag=True, help="Also remove documents whose files are gone from these paths.")
@click.option("--recursive/--no-recursive", default=True, help="Descend into sub-folders (default: yes).")
@click.option("--create", "create_missing", is_flag=True, help="Create the knowledge base if it does not exist.")
@click.option(
    "--corpus", "as_corpus", is_flag=True,
    help="Read .jsonl files as corpora: one document per record (files named corpus.jsonl always are).",
)
@click.option("--id-field", default="_id", show_default=True, help="Corpus records: the field holding the document id.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@config_options
def ingest_cmd(
    name: str,
    paths: tuple[str, ...],
    sync: bool,
    recursive: bool,
    create_missing: bool,
    as_corpus: bool,
    id_field: str,
    as_json: bool
) -> None:
    """Ingest files, folders or globs (txt, md, html, pdf, docx, json, jsonl, csv).

    Unchanged files are skipped, changed files replace their chunks; with --sync,
    documents under PATHS whose files disappeared are removed. A corpus file
    (BEIR's corpus.jsonl, or any .jsonl with --corpus) gives one document per record,
    named by its id, with title + text as its content.
    """
    from lorag.knowledge.corpus import expand_corpora
    from lorag.knowledge.source_files import collect_paths

    collected = expand_corpora(
        collect_paths(paths, recursive=recursive), forced=as_corpus or id_field != "_id", id_field=id_field
    )
    with knowledge_service() as service:
        if create_missing and not service.exists(name):
            service.create(name)
        bar: Any = click.progressbar(
            length=len(collected.files),
            label=f"ingesting into {name}",
            file=sys.stderr,
            show_pos=True,
            item_show_func=lambda item: _short(item) if item else None,
        )
        try:
            with bar:
                def progress(event: str, source: str) -> None:
                    if event != "removed":
                        bar.update(1, source)

                report = service.ingest_files(
                    name,
                    collected.files,
                    skipped=collected.skipped,
                    sync_scope=collected.scope if sync else None,
                    progress=progress,
                )
        except KeyboardInterrupt:
            click.echo(
                "\ninterrupted: the knowledge base holds every document finished so far, whole; "
                "run the same command again to finish",
                err=True,
            )
            sys.exit(130)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(
            f"{name}: {len(report.added)} added, {len(report.updated)} updated, {len(report.unchanged)} unchanged, "
            f"{len(report.removed)} removed; {report.chunks_written} chunks written, "
            f"{report.chunks_deleted} deleted ({report.seconds:.1f} s)"
        )
    for skip in report.skipped:
        click.echo(f"skipped {skip.source}: {skip.reason}", err=True)
    if report.failed:
        raise LoragError(f"{len(report.failed)} file(s) could not be ingested (listed above); the rest were")


@kb_group.command("remove")
@click.argument("name")
@click.argument("sources", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@config_options
def remove_cmd(name: str, sources: tuple[str, ...], as_json: bool) -> None:
    """Remove documents (by source path or upload name; a folder removes all under it)."""
    with knowledge_service() as service:
        report = service.remove(name, list(sources))
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(f"{name}: removed {len(report.removed)} document(s), {report.chunks_deleted} chunks")


@kb_group.command("query")
@click.argument("kbs")
@click.argument("query")
@click.option("-k", "--top-k", type=int, default=None, help="How many hits (default: knowledge.retrieval.top_k).")
@click.option("--mode", type=click.Choice(["vector", "keyword", "hybrid"]), default=None)
@click.option("--filter", "filter_pairs", multiple=True, metavar="KEY=VALUE", help="Metadata filter (repeatable).")
@click.option("--where", default=None, help='Metadata filter as JSON, e.g. \'{"page": {"$gte": 2}}\'.')
@click.option("--threshold", type=float, default=None, help="Drop hits scoring below this.")
@click.option("--rerank/--no-rerank", default=None, help="Cross-encoder reranking (needs a reranker model).")
@click.option("--json", "as_json", is_flag=True, help='Print {"hits": [...]} as JSON.')
@config_options
def query_cmd(
    kbs: str,
    query: str,
    top_k: int | None,
    mode: str | None,
    filter_pairs: tuple[str, ...],
    where: str | None,
    threshold: float | None,
    rerank: bool | None,
    as_json: bool
) -> None:
    """Search KBS (one name, or several separated by commas) for QUERY; best hits first."""
    filters = _filters(filter_pairs, where)
    names = [n.strip() for n in kbs.split(",") if n.strip()]
    with knowledge_service() as service:
        hits = service.query(
            names, query, top_k=top_k, mode=mode, filters=filters, score_threshold=threshold, rerank=rerank
        )
    if as_json:
        echo_json({"hits": [hit.to_dict() for hit in hits]})
        return
    if not hits:
        click.echo("no hits")
        return
    for rank, hit in enumerate(hits, start=1):
        where_in = f" ({hit.location})" if hit.location else ""
        kb = f" [{hit.kb}]" if len(names) > 1 else ""
        click.echo(f"{rank:>2}. {hit.score:.4f}  {hit.source}{where_in}{kb}")
        text = " ".join(hit.text.split())
        click.echo(f"    {text[:300]}{'...' if len(text) > 300 else ''}")


@kb_group.command("drop")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_options
def drop_cmd(name: str, yes: bool) -> None:
    """Delete a knowledge base and all its chunks."""
    if not yes:
        if not sys.stdin.isatty():
            raise LoragError(f"dropping {name!r} deletes all its chunks: pass --yes to confirm")
        click.confirm(f"Delete knowledge base {name!r} and all its chunks?", abort=True)
    with knowledge_service() as service:
        service.drop(name)
    click.echo(f"dropped knowledge base {name!r}")


@kb_group.command("import-llama-index")
@click.argument("name")
@click.option("--collection", required=True, help="The llama-index app's Chroma collection (ChromaVectorStore).")
@click.option("--chroma-path", default=None, help="The Chroma directory (chromadb.PersistentClient) holding it.")
@click.option("--chroma-host", default=None, help="Or the Chroma server holding it.")
@click.option("--chroma-port", type=int, default=8000, show_default=True)
@click.option("--description", default="", help="A line saying what the knowledge base holds.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@config_options
def import_llama_index_cmd(
    name: str, collection: str, chroma_path: str | None, chroma_host: str | None, chroma_port: int,
    description: str, as_json: bool,
) -> None:
    """Import a llama-index ChromaVectorStore collection as the new knowledge base NAME, keeping its vectors.

    The collection must have been embedded with this config's embedding model (e.g. through
    lorag.knowledge.llama_embedding.LoragEmbedding); otherwise nothing is created.
    """
    with warnings.catch_warnings():  # llama-index's pydantic schema warning, not the user's concern
        warnings.filterwarnings("ignore", module=r"pydantic\._internal")
        from lorag.knowledge.llama_import import import_collection, open_collection

    if (chroma_path is None) == (chroma_host is None):
        raise LoragError("name the collection's store with one of --chroma-path or --chroma-host")
    source = open_collection(collection, path=chroma_path, host=chroma_host, port=chroma_port)
    with knowledge_service() as service:
        report = import_collection(service, name, source, description=description)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(
            f"{name}: imported {len(report.added)} documents, {report.chunks_written} chunks "
            f"from Chroma collection {collection!r} ({report.seconds:.1f} s)"
        )


def _filters(pairs: tuple[str, ...], where: str | None) -> dict[str, Any] | None:
    filters: dict[str, Any] = {}
    if where:
        try:
            parsed = json.loads(where)
        except json.JSONDecodeError as err:
            raise LoragError(f"--where is not valid JSON: {err}") from None
        if not isinstance(parsed, dict):
            raise LoragError("--where must be a JSON object")
        filters.update(parsed)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise LoragError(f"--filter takes KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(raw)
            if not isinstance(value, (int, float, bool)):
                value = raw
        except json.JSONDecodeError:
            value = raw
        filters[key] = value
    return filters or None


def _short(source: str, width: int = 40) -> str:
    return source if len(source) <= width else "..." + source[-(width - 3) :]


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


from lorag.knowledge.eval_cli import eval_cmd, tune_cmd  # noqa: E402  (they join kb_group here)

kb_group.add_command(eval_cmd)
kb_group.add_command(tune_cmd)
