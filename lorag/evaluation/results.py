"""What an evaluation produces: one scored answer per (strategy, item), and a summary per strategy.

Pure data and arithmetic (no engine), so the scoring and the summaries are tested on
their own; the runner fills these in, the report renders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lorag.evaluation import metrics
from lorag.evaluation.dataset import ALL, EvalItem

if TYPE_CHECKING:
    from lorag.evaluation.graders import Grader


@dataclass
class ItemResult:
    """One item answered under one strategy, with its scores (None: the metric does not apply)."""

    strategy: str
    item: str  # the item's id, else "line N"
    line: int
    domain: str
    question: str
    references: list[str]
    prediction: str = ""
    exact_match: float = 0.0
    f1: float = 0.0
    rouge_l: float = 0.0
    bleu: float = 0.0  # sentence BLEU, 0-100
    hit: float | None = None  # a relevant source was cited (items with sources, strategies that retrieve)
    reciprocal_rank: float | None = None
    schema_valid: bool | None = None  # items with a schema
    format_ok: bool | None = None  # items with a format (regular expression)
    latency_ms: float = 0.0  # prepare + generate, as a caller waits for it
    retrieve_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cited_sources: list[str] = field(default_factory=list)
    error: str | None = None  # the request failed; the item scores 0
    subset: str | None = None  # the item's subset, if it has one
    grades: dict[str, float | None] = field(default_factory=dict)  # the domain's graders (None: could not grade)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(result: ItemResult, item: EvalItem, retrieves: bool) -> ItemResult:
    """Fill in the answer metrics of `result` (its prediction and citations already set)."""
    refs = list(item.answers)
    prediction = result.prediction
    result.exact_match = metrics.exact_match(prediction, refs)
    result.f1 = metrics.token_f1(prediction, refs)
    result.rouge_l = metrics.rouge_l(prediction, refs)
    result.bleu = metrics.sentence_bleu(prediction, refs)
    if item.sources and retrieves:
        result.reciprocal_rank = metrics.reciprocal_rank(result.cited_sources, item.sources)
        result.hit = float(result.reciprocal_rank > 0)
    if item.schema is not None:
        result.schema_valid = result.error is None and metrics.schema_valid(prediction, item.schema)
    if item.format is not None:
        result.format_ok = result.error is None and metrics.format_match(prediction, item.format)
    return result


def grade(result: ItemResult, item: EvalItem, graders: Sequence[Grader]) -> ItemResult:
    """Fill in `result.grades`: each grader on the answer; a failed request scores 0, as in the metrics."""
    from lorag.evaluation.graders import grade_all

    if result.error is not None:
        result.grades = {grader.name: 0.0 for grader in graders}
    else:
        result.grades = grade_all(graders, result.prediction, item.fields())
    return result


@dataclass
class StrategySummary:
    """A strategy's scores over the items it ran on (or one subset of them); BLEU is corpus BLEU,
    the others are means."""

    strategy: str
    items: int
    errors: int
    exact_match: float
    f1: float
    rouge_l: float
    bleu: float
    hit_rate: float | None
    mrr: float | None
    schema_validity: float | None
    format_rate: float | None
    latency_ms_p50: float
    latency_ms_p95: float
    prompt_tokens_mean: float
    completion_tokens_mean: float
    subset: str | None = None  # None: all the items the strategy ran on
    # grader -> mean over the items it graded (None: it graded none of them)
    grades: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"subset": data.pop("subset") or ALL, **data}


def summarise(strategy: str, results: Sequence[ItemResult], subset: str | None = None) -> StrategySummary:
    if not results:
        raise ValueError(f"no results for strategy {strategy!r}")
    latencies = [r.latency_ms for r in results]
    schema = [None if r.schema_valid is None else float(r.schema_valid) for r in results]
    formats = [None if r.format_ok is None else float(r.format_ok) for r in results]
    return StrategySummary(
        strategy=strategy,
        items=len(results),
        errors=sum(1 for r in results if r.error is not None),
        exact_match=_mean([r.exact_match for r in results]),
        f1=_mean([r.f1 for r in results]),
        rouge_l=_mean([r.rouge_l for r in results]),
        bleu=metrics.corpus_bleu([r.prediction for r in results], [r.references for r in results]),
        hit_rate=metrics.mean([r.hit for r in results]),
        mrr=metrics.mean([r.reciprocal_rank for r in results]),
        schema_validity=metrics.mean(schema),
        format_rate=metrics.mean(formats),
        latency_ms_p50=_round(metrics.percentile(latencies, 50)),
        latency_ms_p95=_round(metrics.percentile(latencies, 95)),
        prompt_tokens_mean=_mean([float(r.prompt_tokens) for r in results]),
        completion_tokens_mean=_mean([float(r.completion_tokens) for r in results]),
        subset=subset,
        grades=_mean_grades(results),
    )


def _mean_grades(results: Sequence[ItemResult]) -> dict[str, float | None]:
    """Each grader's mean over the items it graded (items of a domain without it do not count)."""
    names = dict.fromkeys(name for r in results for name in r.grades)
    return {name: metrics.mean([r.grades.get(name) for r in results]) for name in names}


def _mean(values: Sequence[float]) -> float:
    found = metrics.mean(values)
    return 0.0 if found is None else found


def _round(value: float | None) -> float:
    return round(value or 0.0, 2)


@dataclass
class EvalRun:
    """Everything one `lorag eval` found: what was run, each answer, each strategy's summary."""

    meta: dict[str, Any]
    items: list[ItemResult]
    summaries: list[StrategySummary]
    notes: list[str] = field(default_factory=list)  # strategies skipped and why, and the like

    def results_for(self, strategy: str) -> list[ItemResult]:
        return [r for r in self.items if r.strategy == strategy]

    def summary(self, strategy: str) -> StrategySummary | None:
        return next((s for s in self.summaries if s.strategy == strategy), None)

    @property
    def subsets(self) -> list[str]:
        """The items' subsets, in the order they first appear."""
        return list(dict.fromkeys(r.subset for r in self.items if r.subset is not None))

    def for_subset(self, subset: str) -> EvalRun:
        """The same run restricted to one subset's items, each strategy summarised on them alone."""
        items = [r for r in self.items if r.subset == subset]
        summaries = []
        for whole in self.summaries:
            mine = [r for r in items if r.strategy == whole.strategy]
            if mine:
                summaries.append(summarise(whole.strategy, mine, subset=subset))
        return EvalRun(meta={**self.meta, "subset": subset}, items=items, summaries=summaries, notes=list(self.notes))
