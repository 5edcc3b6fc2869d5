"""`lorag kb`: create, list, show, ingest, remove, query, eval, tune and drop knowledge bases."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from lorag.errors import LoragError


def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    """--config and --state-dir on every kb command."""
    func = click.option("--state-dir", default=None, help="State directory (default: from config, or .lorag).")(func)
    func = click.option("--config", "config_path", default=None, help="Path to lorag.toml.")(func)
    return func


@contextmanager
def _service(config_path: str | None, state_dir: str | None) -> Iterator[Any]:
    from lorag.config import load_settings
    from lorag.knowledge.service import KnowledgeService

    settings = load_settings(config_path, {"state_dir": state_dir})
    service = KnowledgeService.from_settings(settings)
    try:
        yield service
    finally:
        service.close()


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


@click.group("kb")
def kb_group() -> None:
    """Knowledge bases: Chroma collections of embedded chunks, searched by vector, BM25 or both."""


@kb_group.command("create")
@click.argument("name")
@click.option("--description", default="", help="A line saying what the knowledge base holds.")
@_common
def create_cmd(name: str, description: str, config_path: str | None, state_dir: str | None) -> None:
    """Create an empty knowledge base (embedded with the configured model)."""
    with _service(config_path, state_dir) as service:
        info = service.create(name, description)
    click.echo(f"created knowledge base {name!r} (embedding model {info['embedding_model']})")


@kb_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_common
def list_cmd(as_json: bool, config_path: str | None, state_dir: str | None) -> None:
    """List knowledge bases with document and chunk counts."""
    with _service(config_path, state_dir) as service:
        bases = service.list_bases()
    if as_json:
        _echo_json({"knowledge_bases": bases})
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
@_common
def show_cmd(name: str, as_json: bool, documents: bool, config_path: str | None, state_dir: str | None) -> None:
    """Show a knowledge base: documents, chunk count, embedding model, size."""
    with _service(config_path, state_dir) as service:
        info = service.show(name, documents=documents)
    if as_json:
        _echo_json(info)
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
        click.echo(f"hybrid fusion    {_fusion_text(fusion)}" + (" (tuned by `kb tune`)" if fusion.get("tuned") else ""))
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
@_common
def ingest_cmd(
    name: str,
    paths: tuple[str, ...],
    sync: bool,
    recursive: bool,
    create_missing: bool,
    as_corpus: bool,
    id_field: str,
    as_json: bool,
    config_path: str | None,
    state_dir: str | None,
) -> None:
    """Ingest files, folders or globs (txt, md, html, pdf, docx, json, jsonl, csv).

    Unchanged files are skipped, changed files replace their chunks; with --sync,
    documents under PATHS whose files disappeared are removed. A corpus file
    (BEIR's corpus.jsonl, or any .jsonl with --corpus) gives one document per record,
    named by its id, with title + text as its content.
    """
    from lorag.knowledge.corpus import expand_corpora
    from lorag.knowledge.ingest import collect_paths

    collected = expand_corpora(
        collect_paths(paths, recursive=recursive), forced=as_corpus or id_field != "_id", id_field=id_field
    )
    with _service(config_path, state_dir) as service:
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
        _echo_json(report.to_dict())
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
@_common
def remove_cmd(name: str, sources: tuple[str, ...], as_json: bool, config_path: str | None, state_dir: str | None) -> None:
    """Remove documents (by source path or upload name; a folder removes all under it)."""
    with _service(config_path, state_dir) as service:
        report = service.remove(name, list(sources))
    if as_json:
        _echo_json(report.to_dict())
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
@_common
def query_cmd(
    kbs: str,
    query: str,
    top_k: int | None,
    mode: str | None,
    filter_pairs: tuple[str, ...],
    where: str | None,
    threshold: float | None,
    rerank: bool | None,
    as_json: bool,
    config_path: str | None,
    state_dir: str | None,
) -> None:
    """Search KBS (one name, or several separated by commas) for QUERY; best hits first."""
    filters = _filters(filter_pairs, where)
    names = [n.strip() for n in kbs.split(",") if n.strip()]
    with _service(config_path, state_dir) as service:
        hits = service.query(
            names, query, top_k=top_k, mode=mode, filters=filters, score_threshold=threshold, rerank=rerank
        )
    if as_json:
        _echo_json({"hits": [hit.to_dict() for hit in hits]})
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
@_common
def drop_cmd(name: str, yes: bool, config_path: str | None, state_dir: str | None) -> None:
    """Delete a knowledge base and all its chunks."""
    if not yes:
        if not sys.stdin.isatty():
            raise LoragError(f"dropping {name!r} deletes all its chunks: pass --yes to confirm")
        click.confirm(f"Delete knowledge base {name!r} and all its chunks?", abort=True)
    with _service(config_path, state_dir) as service:
        service.drop(name)
    click.echo(f"dropped knowledge base {name!r}")


def _judged(service: Any, name: str, queries: str | None, qrels: str | None, allow_unknown: bool) -> Any:
    """The judged set, checked against the base's documents before any query runs."""
    from pathlib import Path

    if not queries or not qrels:
        raise click.UsageError("give QUERIES (queries.jsonl) and QRELS (qrels TSV)")

    from lorag.knowledge.evaluate import document_refs
    from lorag.knowledge.judged import load_files

    documents = document_refs(service, name)
    return load_files(Path(queries), Path(qrels), documents=documents, allow_unknown_documents=allow_unknown)


def _query_bar(judged: Any, label: str) -> Any:
    return click.progressbar(length=len(judged.queries), label=label, file=sys.stderr, show_pos=True)


_JUDGED_OPTIONS = [
    click.argument("name"),
    click.argument("queries", type=click.Path(dir_okay=False), required=False),
    click.argument("qrels", type=click.Path(dir_okay=False), required=False),
    click.option("--depth", type=int, default=None, help="Chunks each retriever returns per query (default 200)."),
    click.option(
        "--allow-unknown-docs", is_flag=True,
        help="Qrels may name documents the base lacks (they count as relevant, never found).",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print JSON."),
]


def _judged_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_JUDGED_OPTIONS):
        func = option(func)
    return _common(func)


@kb_group.command("eval")
@_judged_options
@click.option(
    "--mode", "modes", multiple=True,
    type=click.Choice(["vector", "keyword", "hybrid", "hybrid+rerank"]),
    help="Modes to score (repeatable; default: all, hybrid+rerank when a reranker is configured).",
)
def eval_cmd(
    name: str, queries: str | None, qrels: str | None, depth: int | None, allow_unknown_docs: bool, as_json: bool,
    modes: tuple[str, ...], config_path: str | None, state_dir: str | None,
) -> None:
    """Score retrieval on judged queries: nDCG@10, recall@100, MRR@10 per mode.

    QUERIES is BEIR's queries.jsonl ({"_id", "text"} per line), QRELS its qrels TSV
    (query-id, doc-id, grade; a header line is allowed). Documents are named by their
    corpus record id (see `kb ingest --corpus`) or their source.
    """
    from lorag.knowledge.evaluate import DEFAULT_DEPTH, evaluate

    with _service(config_path, state_dir) as service:
        judged = _judged(service, name, queries, qrels, allow_unknown_docs)
        with _query_bar(judged, f"evaluating {name}") as bar:
            result = evaluate(
                service, name, judged, depth=depth or DEFAULT_DEPTH, modes=list(modes) or None, progress=bar.update
            )
    if as_json:
        _echo_json(result)
        return
    click.echo(
        f"{name}: {result['queries']} judged queries, {result['judgements']} judgements, "
        f"{result['depth']} chunks per retriever, hybrid = {_fusion_text(result['fusion'])}"
    )
    click.echo(f"{'mode':<15}{'nDCG@10':>9}{'recall@100':>12}{'MRR@10':>9}")
    for mode, row in result["modes"].items():
        click.echo(f"{mode:<15}{row['ndcg@10']:>9.4f}{row['recall@100']:>12.4f}{row['mrr@10']:>9.4f}")


@kb_group.command("tune")
@_judged_options
@click.option("--held-out", type=float, default=0.3, show_default=True, help="Share of queries kept out of the fit.")
@click.option("--method", type=click.Choice(["convex", "rrf"]), default=None, help="Fusion family (default: the configured one).")
@click.option("--dry-run", is_flag=True, help="Report only; keep the base's fusion settings as they are.")
@click.option("--reset", is_flag=True, help="Forget the base's tuned fusion (back to the configured default) and stop.")
def tune_cmd(
    name: str, queries: str | None, qrels: str | None, depth: int | None, allow_unknown_docs: bool, as_json: bool,
    held_out: float, method: str | None, dry_run: bool, reset: bool, config_path: str | None, state_dir: str | None,
) -> None:
    """Fit this base's hybrid fusion weights on its judged queries and store them.

    The queries are split (stable, by id): weights are fitted on one part and the
    other part's scores are reported, default against tuned.
    """
    from lorag.knowledge.evaluate import DEFAULT_DEPTH
    from lorag.knowledge.tune import tune

    with _service(config_path, state_dir) as service:
        if reset:
            service._info(name)
            service.set_fusion(name, None)
            click.echo(f"{name}: tuned fusion forgotten; hybrid uses the configured default")
            return
        judged = _judged(service, name, queries, qrels, allow_unknown_docs)
        with _query_bar(judged, f"tuning {name}") as bar:
            result = tune(
                service, name, judged, held_out=held_out, depth=depth or DEFAULT_DEPTH, method=method,
                store=not dry_run, progress=bar.update,
            )
    if as_json:
        _echo_json(result)
        return
    counts = result["queries"]
    click.echo(
        f"{name}: fitted on {counts['fit']} queries, scored on {counts['held_out']} held-out queries; "
        f"tuned = {_fusion_text(result['tuned'])}" + ("" if result["stored"] else " (not stored: --dry-run)")
    )
    click.echo(f"{'held-out':<18}{'nDCG@10':>9}{'recall@100':>12}{'MRR@10':>9}")
    for mode, row in result["held_out"].items():
        click.echo(f"{mode:<18}{row['ndcg@10']:>9.4f}{row['recall@100']:>12.4f}{row['mrr@10']:>9.4f}")


def _fusion_text(settings: dict[str, Any]) -> str:
    from lorag.knowledge.fusion import Fusion

    return Fusion.from_settings_dict(settings).describe()


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
