"""`lorag kb eval` and `lorag kb tune`: retrieval quality on a judged set, and fusion fitted to it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from lorag.cli_options import config_options
from lorag.knowledge.cli_common import echo_json, fusion_text, knowledge_service


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
    return config_options(func)


@click.command("eval")
@_judged_options
@click.option(
    "--mode", "modes", multiple=True,
    type=click.Choice(["vector", "keyword", "hybrid", "hybrid+rerank"]),
    help="Modes to score (repeatable; default: all, hybrid+rerank when a reranker is configured).",
)
def eval_cmd(
    name: str, queries: str | None, qrels: str | None, depth: int | None, allow_unknown_docs: bool, as_json: bool,
    modes: tuple[str, ...]
) -> None:
    """Score retrieval on judged queries: nDCG@10, recall@100, MRR@10 per mode.

    QUERIES is BEIR's queries.jsonl ({"_id", "text"} per line), QRELS its qrels TSV
    (query-id, doc-id, grade; a header line is allowed). Documents are named by their
    corpus record id (see `kb ingest --corpus`) or their source.
    """
    from lorag.knowledge.evaluate import DEFAULT_DEPTH, evaluate

    with knowledge_service() as service:
        judged = _judged(service, name, queries, qrels, allow_unknown_docs)
        with _query_bar(judged, f"evaluating {name}") as bar:
            result = evaluate(
                service, name, judged, depth=depth or DEFAULT_DEPTH, modes=list(modes) or None, progress=bar.update
            )
    if as_json:
        echo_json(result)
        return
    click.echo(
        f"{name}: {result['queries']} judged queries, {result['judgements']} judgements, "
        f"{result['depth']} chunks per retriever, hybrid = {fusion_text(result['fusion'])}"
    )
    click.echo(f"{'mode':<15}{'nDCG@10':>9}{'recall@100':>12}{'MRR@10':>9}")
    for mode, row in result["modes"].items():
        click.echo(f"{mode:<15}{row['ndcg@10']:>9.4f}{row['recall@100']:>12.4f}{row['mrr@10']:>9.4f}")


@click.command("tune")
@_judged_options
@click.option("--held-out", type=float, default=0.3, show_default=True, help="Share of queries kept out of the fit.")
@click.option("--method", type=click.Choice(["convex", "rrf"]), default=None, help="Fusion family (default: the configured one).")
@click.option("--dry-run", is_flag=True, help="Report only; keep the base's fusion settings as they are.")
@click.option("--reset", is_flag=True, help="Forget the base's tuned fusion (back to the configured default) and stop.")
def tune_cmd(
    name: str, queries: str | None, qrels: str | None, depth: int | None, allow_unknown_docs: bool, as_json: bool,
    held_out: float, method: str | None, dry_run: bool, reset: bool
) -> None:
    """Fit this base's hybrid fusion weights on its judged queries and store them.

    The queries are split (stable, by id): weights are fitted on one part and the
    other part's scores are reported, default against tuned.
    """
    from lorag.knowledge.evaluate import DEFAULT_DEPTH
    from lorag.knowledge.tune import tune

    with knowledge_service() as service:
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
        echo_json(result)
        return
    counts = result["queries"]
    click.echo(
        f"{name}: fitted on {counts['fit']} queries, scored on {counts['held_out']} held-out queries; "
        f"tuned = {fusion_text(result['tuned'])}" + ("" if result["stored"] else " (not stored: --dry-run)")
    )
    click.echo(f"{'held-out':<18}{'nDCG@10':>9}{'recall@100':>12}{'MRR@10':>9}")
    for mode, row in result["held_out"].items():
        click.echo(f"{mode:<18}{row['ndcg@10']:>9.4f}{row['recall@100']:>12.4f}{row['mrr@10']:>9.4f}")
