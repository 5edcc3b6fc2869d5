"""The gate between a finished fine-tuning job and a domain's traffic.

A job created with `promote: {"domain": ...}` ends here once it trained and passed its canary:
its adapter is registered as a new, inactive version of the domain's adapter (version = the job
id), then the new version and the domain's current one answer the same held-out items (the
job's eval file, else its validation file) through the domain, greedily, and the domain's
graders score both (token F1 against the reference where the domain has none). The new version
is activated only if it is not worse beyond the noise bound `lorag eval` uses (the mean paired
difference >= minus 1.96 standard errors, on at least MIN_ITEMS items). Otherwise it stays
registered and inactive. Either way the comparison is in the job's events and its `promotion`
field. Rollback is `lorag adapters activate NAME PREVIOUS`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorag.errors import LoragError, NotFoundError
from lorag.evaluation.metrics import token_f1
from lorag.evaluation.noise import MIN_ITEMS, paired_difference
from lorag.improve.answers import PipelineAnswerer
from lorag.improve.data import each, mean_grade
from lorag.logging import get_logger
from lorag.serving.jobs import last_user_text
from lorag.serving.principal import ANONYMOUS_ADMIN

if TYPE_CHECKING:
    from lorag.adapters.service import AdapterService
    from lorag.evaluation.graders import Grader
    from lorag.serving.pipeline import Pipeline

log = get_logger("lorag.loop")
NO_ADAPTER = "none"


@dataclass(frozen=True)
class EvalCase:
    """One held-out item: the conversation, the reference answer, and fields graders may read."""

    messages: list[dict[str, Any]]
    reference: str
    fields: dict[str, Any]


@dataclass
class Verdict:
    """What the gate measured and decided (the job's `promotion` field)."""

    domain: str
    adapter: str
    candidate: str
    previous: str | None
    items: int
    candidate_score: float
    previous_score: float
    difference: float
    margin: float
    graders: list[str]
    promoted: bool
    reason: str
    scores: dict[str, list[float]]  # per held-out item, in the file's order: "candidate", "previous"

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        found["margin"] = None if found["margin"] == float("inf") else round(found["margin"], 6)
        for key in ("candidate_score", "previous_score", "difference"):
            found[key] = round(found[key], 6)
        return found


def read_cases(path: Path, limit: int) -> list[EvalCase]:
    """Held-out items from a supervised (`messages`) or preference (`input`, `preferred_output`) JSONL file."""
    cases = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        line = json.loads(raw)
        if "messages" in line:
            messages = list(line["messages"])
            while messages and messages[-1].get("role") != "assistant":
                messages.pop()
            if not messages:
                raise LoragError(f"eval file line {number}: no assistant answer to compare with", param="promote")
            prompt, reference = messages[:-1], str(messages[-1].get("content") or "")
        elif "input" in line:
            prompt = list(line["input"]["messages"])
            reference = str(line.get("preferred_output", [{}])[0].get("content") or "")
        else:
            raise LoragError(f"eval file line {number}: neither `messages` nor `input`", param="promote")
        origin = line.get("provenance", {})
        fields = {"question": last_user_text(prompt), "reference": reference, **origin.get("metadata", {})}
        cases.append(EvalCase(prompt, reference, fields))
        if len(cases) >= limit:
            break
    return cases


def score_of(answer: str, case: EvalCase, graders: Sequence[Grader]) -> float:
    """The mean of the graders' normalised scores (an answer they cannot grade scores 0), or token F1
    against the reference when the domain has no graders."""
    if not graders:
        return token_f1(answer, [case.reference])
    return mean_grade(graders, answer, case.fields) or 0.0


def decide(candidate: list[float], previous: list[float]) -> tuple[bool, float, float, str]:
    """Promote when the new version is not worse beyond the noise bound, on enough items."""
    difference, margin = paired_difference([c - p for c, p in zip(candidate, previous, strict=True)])
    if len(candidate) < MIN_ITEMS:
        return False, difference, margin, f"only {len(candidate)} held-out items (at least {MIN_ITEMS} needed)"
    if difference >= -margin:
        return True, difference, margin, (f"not worse beyond the noise bound ({difference:+.4f} >= "
                                          f"-{margin:.4f})")
    return False, difference, margin, f"worse beyond the noise bound ({difference:+.4f} < -{margin:.4f})"


class Promoter:
    """Registers, compares and maybe activates a job's adapter in a domain (see the module docstring)."""

    def __init__(self, pipeline: Pipeline, adapters: AdapterService) -> None:
        self.pipeline = pipeline
        self.adapters = adapters

    def check(self, domain: str) -> str:
        """The adapter name a job may promote into `domain` (at job creation: a clear 400 otherwise)."""
        settings = self.pipeline.settings.domains.get(domain)
        if settings is None:
            raise LoragError(f"promote.domain: no domain named {domain!r}.", param="promote.domain")
        if not settings.adapter or settings.adapter == NO_ADAPTER:
            raise LoragError(f"promote.domain: the domain {domain!r} names no adapter to promote into "
                             "(set domains.<name>.adapter).", param="promote.domain")
        if "@" in settings.adapter:
            raise LoragError(f"promote.domain: the domain {domain!r} pins {settings.adapter}; a pinned version "
                             "is never replaced.", param="promote.domain")
        return settings.adapter

    async def promote(self, job_id: str, adapter_dir: Path, spec: dict[str, Any], cases_path: Path,
                      owner: str | None) -> Verdict:
        from lorag.evaluation.graders import domain_graders

        domain = spec["domain"]
        name = self.check(domain)
        previous = self._current(name)
        candidate = await self._registered(name, job_id, adapter_dir, owner)
        graders = [g for g in domain_graders(self.pipeline.settings, domain)
                   if spec.get("graders") is None or g.name in spec["graders"]]
        cases = read_cases(cases_path, int(spec.get("max_items") or 200))
        max_tokens = spec.get("max_tokens")
        new_scores = await self._scores(domain, f"{name}@{candidate}", cases, graders, max_tokens)
        old_scores = await self._scores(domain, f"{name}@{previous}" if previous else NO_ADAPTER, cases, graders,
                                        max_tokens)
        promoted, difference, margin, reason = decide(new_scores, old_scores)
        if promoted:
            await asyncio.to_thread(self.adapters.registry.activate, name, candidate)
        verdict = Verdict(domain, name, candidate, previous, len(cases), _mean(new_scores), _mean(old_scores),
                          difference, margin, [g.name for g in graders] or ["token_f1"], promoted, reason,
                          {"candidate": [round(x, 6) for x in new_scores],
                           "previous": [round(x, 6) for x in old_scores]})
        log.info("loop.promotion", job=job_id, **verdict.to_dict())
        return verdict

    def _current(self, name: str) -> str | None:
        try:
            return self.adapters.registry.resolve(name).version
        except NotFoundError:
            return None

    async def _registered(self, name: str, version: str, adapter_dir: Path, owner: str | None) -> str:
        """The job's adapter as `name@<job id>`, inactive (once: a finish redone after a restart reuses it)."""
        try:
            return self.adapters.registry.resolve(f"{name}@{version}").version
        except NotFoundError:
            entry = await self.adapters.add(name, adapter_dir, version=version, activate=False, trusted=True,
                                            owner=owner)
            return entry.version

    async def _scores(self, domain: str, adapter: str, cases: list[EvalCase], graders: Sequence[Grader],
                      max_tokens: int | None) -> list[float]:
        answerer = PipelineAnswerer(self.pipeline, ANONYMOUS_ADMIN)
        answers = await each(cases, lambda case: answerer.answer(domain, case.messages, temperature=0.0,
                                                                 max_tokens=max_tokens, options={"adapter": adapter}),
                             None)
        return await asyncio.to_thread(lambda: [score_of(a[0], case, graders) for a, case in zip(answers, cases,
                                                                                                  strict=True)])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
