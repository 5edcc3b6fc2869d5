"""Run an evaluation set through the real pipeline, once per strategy.

Each strategy is the same chat request to the item's domain with a different `lorag`
override (the field any API caller may send), so what is measured is exactly what a
client of that domain would get: the domain's prompt, retrieval, few-shot examples,
adapter and plugins, through the in-process pipeline `lorag chat` uses (no server, no
HTTP in the timings). Decoding is greedy (temperature 0) so runs repeat.

Requests run one at a time, so latency is a single caller's wait; each strategy gets one
unmeasured warm-up request first (adapter load, embedding model load), so a strategy's
first item does not carry a one-off cost the others do not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorag.errors import LoragError
from lorag.evaluation.dataset import EvalItem
from lorag.evaluation.results import EvalRun, ItemResult, grade, score, summarise
from lorag.logging import get_logger

if TYPE_CHECKING:
    from lorag.config import Settings
    from lorag.evaluation.graders import Grader
    from lorag.serving.pipeline import Pipeline
    from lorag.serving.settings import DomainSettings

log = get_logger("lorag.eval")


@dataclass(frozen=True)
class Strategy:
    """Which of the domain's parts answer: its adapter, its knowledge bases, its few-shot examples."""

    name: str
    adapter: bool
    retrieval: bool
    examples: bool

    def overrides(self) -> dict[str, Any]:
        """The request's `lorag` field: switch off what this strategy leaves out; the rest is the domain's."""
        options: dict[str, Any] = {}
        if not self.adapter:
            options["adapter"] = "none"
        if not self.retrieval:
            options["no_retrieval"] = True
        if not self.examples:
            options["examples"] = 0
        return options

    def missing(self, domain: DomainSettings) -> list[str]:
        """The parts this strategy needs that the domain does not have (then it is skipped there)."""
        gaps = []
        if self.adapter and not domain.adapter:
            gaps.append("adapter")
        if self.retrieval and not domain.knowledge.bases:
            gaps.append("knowledge bases")
        if self.examples and (domain.examples.k == 0 or not (domain.examples.items or domain.examples.file)):
            gaps.append("few-shot examples")
        return gaps


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("base", adapter=False, retrieval=False, examples=False),
        Strategy("icl", adapter=False, retrieval=False, examples=True),
        Strategy("rag", adapter=False, retrieval=True, examples=False),
        Strategy("adapter", adapter=True, retrieval=False, examples=False),
        Strategy("adapter+rag", adapter=True, retrieval=True, examples=False),
        Strategy("adapter+rag+icl", adapter=True, retrieval=True, examples=True),
    )
}


class EvalError(LoragError):
    code = "eval_failed"


def parse_strategies(text: str) -> list[Strategy]:
    """'base,rag' -> those strategies, in the order given; unknown names are refused with the valid ones."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise EvalError(f"unknown strateg{'ies' if len(unknown) > 1 else 'y'} {', '.join(map(repr, unknown))}; "
                        f"choose from {', '.join(STRATEGIES)}" if unknown else "no strategies given")
    return [STRATEGIES[n] for n in dict.fromkeys(names)]


def assign_domains(items: Sequence[EvalItem], default: str | None, settings: Settings) -> dict[int, str]:
    """item line -> domain: the item's own, else `default`, else the only configured domain."""
    configured = settings.domains
    if default is None and len(configured) == 1:
        default = next(iter(configured))
    chosen: dict[int, str] = {}
    for item in items:
        domain = item.domain or default
        if domain is None:
            names = ", ".join(configured) or "none are configured in lorag.toml"
            raise EvalError(f"line {item.line}: no domain for this question; pass --domain or give the item a "
                            f"'domain' (domains: {names})")
        if domain not in configured:
            raise EvalError(f"line {item.line}: no domain named '{domain}' in lorag.toml "
                            f"(domains: {', '.join(configured) or 'none'})")
        chosen[item.line] = domain
    return chosen


Progress = Callable[[ItemResult], None]


@dataclass
class Plan:
    """Each strategy with the items it runs on, and why any strategy is left out somewhere."""

    runs: list[tuple[Strategy, list[EvalItem]]]
    notes: list[str]

    @property
    def requests(self) -> int:
        return sum(len(todo) for _, todo in self.runs)


def plan_runs(items: Sequence[EvalItem], strategies: Sequence[Strategy], domains: dict[int, str],
              settings: Settings) -> Plan:
    """Each strategy on the items whose domain has what it needs; the rest is noted, not run."""
    runs = []
    notes = []
    profiles = settings.domains
    for strategy in strategies:
        todo = [item for item in items if not strategy.missing(profiles[domains[item.line]])]
        for domain in sorted({domains[i.line] for i in items} - {domains[i.line] for i in todo}):
            gaps = strategy.missing(profiles[domain])
            listed = ", ".join(gaps[:-1]) + (" or " if len(gaps) > 1 else "") + gaps[-1]
            notes.append(f"{strategy.name}: not run for domain '{domain}', which has no {listed}")
        if todo:
            runs.append((strategy, todo))
    if not runs:
        raise EvalError("no strategy can run on these domains: " + "; ".join(notes))
    return Plan(runs, notes)


def pick_graders(settings: Settings, items: Sequence[EvalItem], domains: dict[int, str],
                 names: Sequence[str] = ()) -> dict[str, list[Grader]]:
    """domain -> the graders to run on its answers: all of the domain's, or only those `names`
    (`--grader`). Refused before anything runs: a name no domain of the run has, and an item
    without a field its graders' templates read."""
    from lorag.evaluation.graders import domain_graders
    from lorag.loop.grader_settings import item_fields

    used = sorted(set(domains.values()))
    chosen = {domain: domain_graders(settings, domain, set(names) if names else None) for domain in used}
    found = {grader.name for graders in chosen.values() for grader in graders}
    unknown = [name for name in dict.fromkeys(names) if name not in found]
    if unknown:
        have = sorted({spec.name for domain in used for spec in settings.domains[domain].graders})
        raise EvalError(f"no grader named {', '.join(map(repr, unknown))} in the domains evaluated "
                        f"(graders: {', '.join(have) or 'none are configured'})")
    for item in items:
        domain = domains[item.line]
        for spec in settings.domains[domain].graders:
            missing = sorted(item_fields(spec) - set(item.fields())) if spec.name in found else []
            if missing:
                raise EvalError(f"line {item.line}: grader '{spec.name}' of domain '{domain}' reads "
                                f"{{{{item.{missing[0]}}}}}, which this item does not have")
    return chosen


class Evaluator:
    """Runs items under strategies on one in-process pipeline (an event loop of its own)."""

    def __init__(self, pipeline: Pipeline, run: Callable[[Any], Any], max_tokens: int | None,
                 concurrency: int = 1, graders: Mapping[str, Sequence[Grader]] | None = None) -> None:
        self.pipeline = pipeline
        self.run = run  # runs a coroutine to completion on the pipeline's loop
        self.max_tokens = max_tokens  # None: each domain's own default
        # Requests in flight at once: the engine batches them (greedy answers do not change;
        # latencies are then those of a loaded server).
        self.concurrency = concurrency
        # domain -> graders of its answers (pick_graders); run after each strategy's answers, off the
        # pipeline's loop, since a judge model is a blocking HTTP call.
        self.graders = graders or {}

    def evaluate(self, plan: Plan, domains: dict[int, str], progress: Progress | None = None,
                 meta: dict[str, Any] | None = None) -> EvalRun:
        """Every planned (strategy, item) request, strategy by strategy; `progress` sees each result."""
        started = time.perf_counter()
        log.info("eval.start", strategies=[s.name for s, _ in plan.runs], requests=plan.requests)
        results: list[ItemResult] = []
        summaries = []
        for strategy, todo in plan.runs:
            self.answer(todo[0], strategy, domains[todo[0].line])  # warm-up, not measured
            mine = self.run(self._answer_all(todo, strategy, domains, progress))
            by_line = {item.line: item for item in todo}
            for result in mine:
                grade(result, by_line[result.line], self.graders.get(result.domain, ()))
            summary = summarise(strategy.name, mine)
            log.info("eval.strategy", strategy=strategy.name, items=summary.items, f1=round(summary.f1, 4),
                     exact_match=round(summary.exact_match, 4), latency_ms_p50=summary.latency_ms_p50,
                     errors=summary.errors, grades=summary.grades)
            results += mine
            summaries.append(summary)
        duration = round(time.perf_counter() - started, 2)
        log.info("eval.done", duration_s=duration, strategies=len(summaries))
        info = {**(meta or {}), "duration_s": duration, "max_tokens": self.max_tokens,
                "concurrency": self.concurrency,
                "model": self.pipeline.base_model, "domains": sorted(set(domains.values()))}
        return EvalRun(meta=info, items=results, summaries=summaries, notes=list(plan.notes))

    async def _answer_all(self, todo: list[EvalItem], strategy: Strategy, domains: dict[int, str],
                          progress: Progress | None) -> list[ItemResult]:
        """Every item of one strategy, at most `concurrency` at a time, in the items' order."""
        gate = asyncio.Semaphore(self.concurrency)

        async def one(item: EvalItem) -> ItemResult:
            async with gate:
                result = await self._answer(item, strategy, domains[item.line])
            if progress is not None:
                progress(result)
            return result

        return list(await asyncio.gather(*(one(item) for item in todo)))

    def answer(self, item: EvalItem, strategy: Strategy, domain: str) -> ItemResult:
        """One request, timed as a caller waits for it, then scored."""
        result: ItemResult = self.run(self._answer(item, strategy, domain))
        return result

    async def _answer(self, item: EvalItem, strategy: Strategy, domain: str) -> ItemResult:
        from lorag.serving.protocol import ChatCompletionRequest

        result = ItemResult(strategy=strategy.name, item=item.name, line=item.line, domain=domain,
                            question=item.question, references=list(item.answers), subset=item.subset)
        body: dict[str, Any] = {
            "model": domain,
            "messages": [{"role": "user", "content": item.question}],
            "temperature": 0,
            "lorag": strategy.overrides(),
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        request = ChatCompletionRequest.model_validate(body)
        started = time.perf_counter()
        try:
            job, choices = await self._ask(request)
        except LoragError as err:
            if _systemic(err):
                raise EvalError(f"{strategy.name}, {item.name} (domain '{domain}'): {err.message}") from None
            result.error = err.message
            log.warning("eval.item_failed", strategy=strategy.name, item=item.name, error=err.message)
        else:
            result.prediction = choices[0].text if choices else ""
            result.completion_tokens = job.completion_tokens
            result.prompt_tokens = job.prompt_tokens
            result.cited_sources = [hit.source for hit in job.citations]
            result.retrieve_ms = job.timings.get("retrieve_ms")
        result.latency_ms = round((time.perf_counter() - started) * 1000, 2)
        return score(result, item, strategy.retrieval)

    async def _ask(self, request: Any) -> tuple[Any, Any]:
        from lorag.serving.jobs import new_request_id

        job = await self.pipeline.prepare_chat(request, new_request_id("eval"))
        return job, await self.pipeline.complete(job)


def _systemic(err: LoragError) -> bool:
    """Errors every item would hit (no adapter, store locked, engine down, --max-tokens over the domain's
    limit): stop, do not score zeros. A prompt too long for the context is one item's problem."""
    if err.code == "context_length_exceeded":
        return False
    param = err.param or ""
    return (err.status_code >= 500 or err.status_code in (401, 403, 404, 409, 423)
            or param in ("model", "max_tokens") or param.startswith("lorag."))
