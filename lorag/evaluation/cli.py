"""`lorag eval DATA.jsonl`: which strategy answers this data best, with numbers.

Everything that can be wrong with the command (data, strategies, domains) is checked
before the engine starts: a typo must not cost a minute of model loading.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import click

from lorag.cli_options import config_options

STRATEGIES_HELP = "Comma-separated, from: base, icl, rag, adapter, adapter+rag, adapter+rag+icl."


@click.command("eval")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--domain", "-d", help="Domain for items without their own 'domain' "
                                     "(default: the only configured domain).")
@click.option("--strategies", "-s", default="base,icl,rag,adapter,adapter+rag,adapter+rag+icl",
              show_default=True, help=STRATEGIES_HELP)
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for results.json, summary.csv, items.csv and the chart "
                   "(default: ./lorag-eval/<data>-<time>).")
@click.option("--max-tokens", type=click.IntRange(min=1),
              help="Most tokens per answer (default: each domain's own generation default).")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests in flight at once; the engine batches them (same greedy answers, loaded latencies).")
@click.option("--grader", "grader_names", multiple=True, metavar="NAME",
              help="Run only this grader of the domains' (repeatable; default: all of each domain's graders).")
@config_options
@click.option("--model", "engine_model", help="Base model path (default: model.path from lorag.toml).")
def eval_command(data: Path, domain: str | None, strategies: str, out_dir: Path | None, max_tokens: int | None,
                 concurrency: int, grader_names: tuple[str, ...], engine_model: str | None) -> None:
    """Answer every question of DATA (JSONL) under each strategy and report which wins.

    Each line: {"question", "answer", "sources"?, "schema"?, "domain"?, "subset"?, "format"?, "id"?}.
    See docs/eval.md.
    """
    from lorag.cli_options import settings_from_flags
    from lorag.evaluation import report
    from lorag.evaluation.dataset import load_eval_set
    from lorag.evaluation.runner import (
        Evaluator,
        assign_domains,
        parse_strategies,
        pick_graders,
        plan_runs,
    )
    from lorag.serving.local import LocalPipeline

    items = load_eval_set(data)
    chosen = parse_strategies(strategies)
    settings = settings_from_flags(model=engine_model)
    domains = assign_domains(items, domain, settings)
    plan = plan_runs(items, chosen, domains, settings)
    graders = pick_graders(settings, items, domains, grader_names)
    out = out_dir or Path("lorag-eval") / f"{data.stem}-{time.strftime('%Y%m%d-%H%M%S')}"

    local = LocalPipeline(settings)
    try:
        # What the server warms before it is ready (embedding model, knowledge bases, routing), here too:
        # loaded by the first request instead, it can outlast the domain's retrieval timeout on a busy machine.
        from lorag.serving.warmup import warm_up

        warm_up(local.pipeline.knowledge, local.pipeline.domains, local.pipeline.router)
        evaluator = Evaluator(local.pipeline, local.loop.run_until_complete, max_tokens, concurrency, graders)
        meta = {"data": str(data.resolve()), "items": len(items), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with _progress(plan.requests) as step:
            run = evaluator.evaluate(plan, domains, progress=step, meta=meta)
    finally:
        local.close()

    advice = report.recommendation(run)
    files = report.write_all(run, out, advice)
    click.echo(report.table(report.all_summaries(run)))
    for note in run.notes:
        click.echo(f"note: {note}")
    click.echo()
    click.echo(advice)
    for subset, subset_advice in report.subset_recommendations(run).items():
        click.echo(f"\n{subset}: {subset_advice}")
    click.echo(f"\nresults: {files[report.JSON_FILE]} (and {report.SUMMARY_CSV}, {report.ITEMS_CSV}, "
               f"{report.CHART_FILE} beside it)")


class _progress:
    """A tqdm bar over every (strategy, item) request on a terminal. Off one (a CI log, a file)
    the bar is silent and the engine's logs are quiet, so a plain line at every tenth of the way
    shows that a run of many minutes is alive."""

    def __init__(self, total: int, file: TextIO | None = None) -> None:
        self.total = total
        self.file = file or sys.stderr
        self.bar: Any = None

    def __enter__(self) -> Callable[[Any], None]:
        if self.file.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="eval", unit="q", dynamic_ncols=True, file=self.file)

            def step(result: Any) -> None:
                self.bar.set_postfix(strategy=result.strategy, refresh=False)
                self.bar.update(1)

            return step
        started, done, shown = time.monotonic(), 0, 0

        def plain(result: Any) -> None:
            nonlocal done, shown
            done += 1
            tenth = done * 10 // max(1, self.total)
            if tenth > shown:
                shown = tenth
                print(f"eval: {done}/{self.total} answers ({done * 100 // max(1, self.total)}%), "
                      f"now {result.strategy}, {time.monotonic() - started:.0f} s", file=self.file, flush=True)

        return plain

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
