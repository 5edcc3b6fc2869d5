"""From traffic to training files: stored completions (and their feedback) become a fine-tuning file.

Four kinds (docs/loop.md):
- `supervised`: answers rated good, corrected answers in place of bad ones;
- `preference`: stated preferences and rated pairs (DPO);
- `best_of_n`: n answers sampled per stored prompt from what serves the prompt's model now, scored
  by one of the domain's graders, the best against the worst when `margin` apart (RLAIF when the
  grader is a model);
- `distillation`: a teacher (a lorag domain, e.g. the same one with retrieval, or any
  OpenAI-compatible model) answers the stored or given prompts; its answers are the student's
  supervised data (the prompt without the retrieved context: knowledge moves into the weights).

Every line carries `provenance` (completion ids, rating and preference ids, grader, teacher) and
passed the domain's input guards again; an optional seeded hold-out split becomes a second file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lorag.errors import LoragError
from lorag.logging import get_logger
from lorag.loop import training_data
from lorag.loop.completions import StoredCompletion
from lorag.loop.training_data import Line, PromptView
from lorag.serving.jobs import last_user_text

if TYPE_CHECKING:
    from lorag.evaluation.graders import Grader
    from lorag.improve.answers import Answerer

log = get_logger("lorag.loop")
Kind = Literal["supervised", "preference", "best_of_n", "distillation"]
CONCURRENCY = 8  # prompts in flight at once while sampling or asking a teacher


class Teacher(BaseModel):
    """Who answers for distillation: a model on this server (a domain, adapter or the base), or elsewhere."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    base_url: str | None = None  # None: this lorag server, in process
    api_key_env: str | None = None
    options: dict[str, Any] | None = None  # the request's `lorag` field (e.g. {"top_k": 8})
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)  # greedy: the teacher's best answer


class DataRequest(BaseModel):
    """POST /v1/training_data and `lorag data build`: what to select and how to turn it into lines."""

    model_config = ConfigDict(extra="forbid")
    kind: Kind
    domain: str | None = None
    model: str | None = None
    metadata: dict[str, str] | None = None
    since: int | None = None  # unix seconds, inclusive
    until: int | None = None  # unix seconds, exclusive
    prompt: PromptView = "conversation"
    min_score: float = Field(default=0.5, ge=-1, le=1)
    margin: float = Field(default=0.5, ge=0)
    n: int = Field(default=4, ge=2, le=16)
    grader: str | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    teacher: Teacher | None = None
    prompts: list[list[dict[str, Any]]] | None = None  # distillation: these conversations, not stored ones
    holdout: float = Field(default=0.0, ge=0, lt=1)
    seed: int = 0
    filename: str | None = None

    @model_validator(mode="after")
    def _fits_kind(self) -> DataRequest:
        if self.kind == "distillation" and self.teacher is None:
            raise ValueError("distillation needs a `teacher` ({\"model\": ...})")
        if self.kind != "distillation" and (self.teacher is not None or self.prompts is not None):
            raise ValueError("`teacher` and `prompts` are for kind 'distillation'")
        if self.kind == "best_of_n" and self.domain is None:
            raise ValueError("best_of_n needs a `domain` (its graders score the samples)")
        return self


@dataclass
class Built:
    """The lines made, those held out, and what was left out and why."""

    lines: list[Line]
    holdout: list[Line] = field(default_factory=list)
    considered: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count


@dataclass
class Sources:
    """What a build may read and call: the selected completions, their feedback, answers, graders, guards."""

    completions: Sequence[StoredCompletion]
    ratings: Sequence[Any]
    preferences: Sequence[Any]
    answerer: Callable[[str | None], Answerer]  # base_url (None: this server) -> an answerer
    graders: Callable[[str], list[Grader]]  # domain -> its graders
    guard: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]  # scope, record -> guarded


async def build(request: DataRequest, sources: Sources, progress: Callable[[int, int], None] | None = None) -> Built:
    """The lines of `request`'s kind, guarded, split into training and held-out by the seeded split."""
    completions = list(sources.completions)
    if request.kind == "supervised":
        lines = training_data.supervised(completions, sources.ratings, min_score=request.min_score,
                                         view=request.prompt)
    elif request.kind == "preference":
        lines = training_data.preferences(completions, sources.ratings, sources.preferences,
                                          margin=request.margin, view=request.prompt)
    elif request.kind == "best_of_n":
        lines = await _best_of_n(request, completions, sources, progress)
    else:
        lines = await _distilled(request, completions, sources, progress)
    built = Built([], considered=len(request.prompts or completions))
    by_id = {record.id: record for record in completions}
    for line in lines:
        first = by_id.get(line.completions[0]) if line.completions else None
        if first is not None and first.metadata:  # what graders read as {{item.*}} when this line is held out
            line.extra.setdefault("metadata", first.metadata)
        scope = request.domain or _scope_of(line, completions) or request.model or ""
        record = await sources.guard(scope, line.record)
        if record is None:
            built.skip("refused_by_guards")
            continue
        line.record = record
        built.lines.append(line)
    built.lines, built.holdout = training_data.split_holdout(built.lines, request.holdout, request.seed,
                                                             key=lambda line: ",".join(line.completions) or
                                                             str(line.record))
    log.info("loop.data_built", kind=request.kind, lines=len(built.lines), holdout=len(built.holdout),
             considered=built.considered, skipped=built.skipped)
    return built


def _scope_of(line: Line, completions: Sequence[StoredCompletion]) -> str | None:
    """The guards of the domain a line's first completion was answered by."""
    first = next((c for c in completions if line.completions and c.id == line.completions[0]), None)
    return None if first is None else first.domain or first.model


async def each(items: Sequence[Any], work: Callable[[Any], Awaitable[Any]],
                progress: Callable[[int, int], None] | None) -> list[Any]:
    """`work` on every item, CONCURRENCY at a time, results in the items' order."""
    gate = asyncio.Semaphore(CONCURRENCY)
    done = 0

    async def one(item: Any) -> Any:
        nonlocal done
        async with gate:
            result = await work(item)
        done += 1
        if progress is not None:
            progress(done, len(items))
        return result

    return list(await asyncio.gather(*(one(item) for item in items)))


def grading_item(record: StoredCompletion) -> dict[str, Any]:
    """What a grader's `{{item.*}}` sees for a stored prompt: the question, and the completion's metadata
    (where a team keeps e.g. an expected answer: `metadata={"reference": ...}`)."""
    return {"question": last_user_text(record.messages), "answer": record.answer(), **record.metadata}


def chosen_graders(domain: str, graders: list[Grader], name: str | None) -> list[Grader]:
    """The grader named, or every one of the domain's (their mean scores a sample)."""
    if not graders:
        raise LoragError(f"The domain {domain!r} has no graders to score samples with: add "
                         f"[[domains.{domain}.graders]] to lorag.toml.", param="grader")
    if name is None:
        return graders
    picked = [g for g in graders if g.name == name]
    if not picked:
        raise LoragError(f"The domain {domain!r} has no grader {name!r} (it has {', '.join(g.name for g in graders)}).",
                         param="grader")
    return picked


def mean_grade(graders: Sequence[Grader], answer: str, item: dict[str, Any]) -> float | None:
    """The mean of the graders' normalised grades; None when none of them could grade the answer."""
    grades = [g for g in (grader.grade(answer, item) for grader in graders) if g is not None]
    return sum(grades) / len(grades) if grades else None


async def _best_of_n(request: DataRequest, completions: list[StoredCompletion], sources: Sources,
                     progress: Callable[[int, int], None] | None) -> list[Line]:
    domain = request.domain or ""
    graders = chosen_graders(domain, sources.graders(domain), request.grader)
    name = "+".join(g.name for g in graders)
    answerer = sources.answerer(None)

    async def sample(record: StoredCompletion) -> Line | None:
        prompt = training_data.prompt_of(record, request.prompt)
        answers = await answerer.answer(record.model, record.messages, n=request.n, temperature=request.temperature,
                                        max_tokens=request.max_tokens)
        item = grading_item(record)
        scores = await asyncio.to_thread(lambda: [mean_grade(graders, answer, item) for answer in answers])
        return training_data.best_of_n(prompt, answers, scores, margin=request.margin, completion=record.id,
                                       grader=name)

    lines = await each(completions, sample, progress)
    return [line for line in lines if line is not None]


async def _distilled(request: DataRequest, completions: list[StoredCompletion], sources: Sources,
                     progress: Callable[[int, int], None] | None) -> list[Line]:
    teacher = request.teacher
    assert teacher is not None  # the request's validator
    answerer = sources.answerer(teacher.base_url)
    where = teacher.base_url or "lorag"
    prompts: list[tuple[list[dict[str, Any]], list[str]]] = (
        [(list(p), []) for p in request.prompts] if request.prompts is not None
        else [(training_data.prompt_of(c, "conversation"), [c.id]) for c in completions])

    async def ask(entry: tuple[list[dict[str, Any]], list[str]]) -> Line | None:
        messages, ids = entry
        answers = await answerer.answer(teacher.model, messages, temperature=teacher.temperature,
                                        max_tokens=teacher.max_tokens or request.max_tokens, options=teacher.options)
        if not answers or not answers[0].strip():
            return None
        return training_data.supervised_line(messages, answers[0], "distillation", ids,
                                             teacher={"model": teacher.model, "endpoint": where,
                                                      "options": teacher.options or {}})

    lines = await each(prompts, ask, progress)
    return [line for line in lines if line is not None]
