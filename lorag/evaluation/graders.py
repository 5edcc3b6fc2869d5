"""Graders: one number in [0, 1] for one answer, from a spec in lorag.toml (OpenAI's grader schema).

The same graders score `lorag eval`'s answers and, later, stored completions in the loop
from serving back to training, so a domain says once what a good answer is. The specs are
lorag.loop.grader_settings; this module runs them:

- string_check: 1.0 / 0.0 by `eq`, `ne`, `like` (contains) or `ilike` (contains, any case);
- text_similarity: lorag's own metrics (lorag.evaluation.metrics, so the numbers are
  `lorag eval`'s) plus difflib's ratio for `fuzzy_match`; BLEU scaled to 0-1;
- score_model: a judge model behind any OpenAI-compatible endpoint, asked with the official
  `openai` client; its reply's score is normalised by the spec's range. A judge that fails,
  or answers no number in the range, gives None for that answer (logged), never an exception:
  one bad reply must not end an hour of grading.

A template that names a field the item lacks is an error (GraderError): that is the
configuration's fault, the same for every answer.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from lorag.errors import LoragError
from lorag.evaluation import metrics
from lorag.logging import get_logger
from lorag.loop.grader_settings import (
    PLACEHOLDER,
    GraderSpec,
    ScoreModelSpec,
    StringCheckSpec,
    TextSimilaritySpec,
)

if TYPE_CHECKING:
    from lorag.config import Settings

log = get_logger("lorag.graders")

_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")


class GraderError(LoragError):
    code = "invalid_grader"


class Grader(Protocol):
    """Scores one answer (`sample`) to one item, normalised to [0, 1]; None: it could not."""

    name: str
    pass_threshold: float | None  # normalised like the scores; None: the grader sets no bar

    def grade(self, sample: str, item: Mapping[str, Any]) -> float | None: ...


def render(template: str, sample: str, item: Mapping[str, Any]) -> str:
    """`{{sample.output_text}}` -> the answer, `{{item.X}}` -> the item's X (JSON unless a string)."""

    def value(match: re.Match[str]) -> str:
        scope, key = match.groups()
        if scope == "sample":
            return sample
        if key not in item:
            raise GraderError(f"{match.group(0)}: the item has no field '{key}' "
                              f"(it has: {', '.join(sorted(item)) or 'none'})")
        found = item[key]
        return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)

    return PLACEHOLDER.sub(value, template)


# -- string_check -------------------------------------------------------------------------

_OPERATIONS: dict[str, Callable[[str, str], bool]] = {
    "eq": lambda got, want: got == want,
    "ne": lambda got, want: got != want,
    "like": lambda got, want: want in got,
    "ilike": lambda got, want: want.casefold() in got.casefold(),
    "matches": lambda got, want: metrics.format_match(got, want),  # lorag's: `lorag eval`'s format rule
}


class StringCheckGrader:
    """1.0 when the rendered input passes the operation against the rendered reference."""

    pass_threshold: float | None = 1.0

    def __init__(self, spec: StringCheckSpec) -> None:
        self.spec = spec
        self.name = spec.name

    def grade(self, sample: str, item: Mapping[str, Any]) -> float | None:
        got = render(self.spec.input, sample, item)
        want = render(self.spec.reference, sample, item)
        return float(_OPERATIONS[self.spec.operation](got, want))


# -- text_similarity ----------------------------------------------------------------------


def fuzzy_match(prediction: str, references: Sequence[str]) -> float:
    """difflib's similarity ratio (2 * matches / total characters), best over the references."""
    return max(difflib.SequenceMatcher(None, prediction, ref).ratio() for ref in references)


def bleu(prediction: str, references: Sequence[str]) -> float:
    """lorag eval's sentence BLEU, on 0-1 like every other grader."""
    return metrics.sentence_bleu(prediction, references) / 100


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    **{f"rouge_{n}": partial(metrics.rouge, kind=f"rouge{n}") for n in range(1, 6)},
    "rouge_l": metrics.rouge_l,
    "token_f1": metrics.token_f1,
    "exact_match": metrics.exact_match,
}


class TextSimilarityGrader:
    """A similarity metric of the rendered input against the rendered reference.

    A reference that is one `{{item.X}}` naming a list of strings (an eval item's `answers`)
    counts each as a reference, the way `lorag eval`'s metrics take the best of them."""

    def __init__(self, spec: TextSimilaritySpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.pass_threshold = spec.pass_threshold
        self.metric = METRICS[spec.evaluation_metric]

    def grade(self, sample: str, item: Mapping[str, Any]) -> float | None:
        return self.metric(render(self.spec.input, sample, item), self._references(sample, item))

    def _references(self, sample: str, item: Mapping[str, Any]) -> list[str]:
        whole = PLACEHOLDER.fullmatch(self.spec.reference.strip())
        if whole and whole.group(1) == "item":
            found = item.get(whole.group(2))
            if isinstance(found, list | tuple) and found and all(isinstance(v, str) for v in found):
                return list(found)
        return [render(self.spec.reference, sample, item)]


# -- score_model --------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeScore:
    """A judge's verdict: the number it gave (in the spec's range), that number on 0-1, its reply."""

    raw: float
    normalised: float
    reply: str


def parse_score(reply: str) -> float | None:
    """JSON {"score": x} or {"result": x} (bare or in a fenced block), a bare JSON number, else the
    first number in the text; None when there is none."""
    try:
        data = metrics.parse_json_answer(reply)
    except ValueError:
        data = None
    if isinstance(data, dict):
        data = next((data[k] for k in ("score", "result") if k in data), None)
    if isinstance(data, int | float) and not isinstance(data, bool):
        return float(data)
    found = _NUMBER.search(reply)
    return float(found.group()) if found else None


class ScoreModelGrader:
    """A judge model's score for the rendered messages, normalised by the spec's range."""

    def __init__(self, spec: ScoreModelSpec) -> None:
        import os

        self.spec = spec
        self.name = spec.name
        self.pass_threshold = None if spec.pass_threshold is None else self.normalise(spec.pass_threshold)
        self.api_key: str | None = None
        if spec.api_key_env is not None:
            self.api_key = os.environ.get(spec.api_key_env)
            if not self.api_key:
                raise GraderError(f"grader '{spec.name}': the environment variable {spec.api_key_env} "
                                  "(its api_key_env) is not set")
        self._client: Any = None

    def normalise(self, raw: float) -> float:
        low, high = self.spec.range
        return (raw - low) / (high - low)

    def messages(self, sample: str, item: Mapping[str, Any]) -> list[dict[str, str]]:
        return [{"role": m.role, "content": render(m.content, sample, item)} for m in self.spec.input]

    def grade(self, sample: str, item: Mapping[str, Any]) -> float | None:
        verdict = self.judge(sample, item)
        return None if verdict is None else verdict.normalised

    def judge(self, sample: str, item: Mapping[str, Any]) -> JudgeScore | None:
        """The judge's score, raw and normalised; None (with an error logged) when there is none."""
        import openai

        messages = self.messages(sample, item)
        where = {"grader": self.name, "model": self.spec.model, "base_url": self.spec.base_url}
        try:
            reply = self._ask(messages)
        except openai.OpenAIError as err:
            log.error("grader.judge_failed", **where, error=f"{type(err).__name__}: {err}")
            return None
        raw = parse_score(reply)
        low, high = self.spec.range
        if raw is None or not low <= raw <= high:
            log.error("grader.bad_score", **where, reply=reply[:200], score=raw, range=[low, high],
                      error="no number in the reply" if raw is None else "the score is outside the range")
            return None
        return JudgeScore(raw, self.normalise(raw), reply)

    def _ask(self, messages: list[dict[str, str]]) -> str:
        import openai

        if self._client is None:
            self._client = openai.OpenAI(base_url=self.spec.base_url, api_key=self.api_key or "no-auth",
                                         timeout=self.spec.timeout_s)
        params = self.spec.sampling_params
        options: dict[str, Any] = {}
        if params is not None:
            limit = params.max_completions_tokens or params.max_tokens
            given = {"temperature": params.temperature, "top_p": params.top_p, "seed": params.seed,
                     "max_tokens": limit}
            options = {k: v for k, v in given.items() if v is not None}
        if self.api_key is None:  # no key: no Authorization header at all
            options["extra_headers"] = {"Authorization": openai.Omit()}
        completion = self._client.chat.completions.create(model=self.spec.model, messages=messages, **options)
        content = completion.choices[0].message.content if completion.choices else None
        return content or ""


# -- building and running -----------------------------------------------------------------


def build_grader(spec: GraderSpec) -> Grader:
    """The grader a spec describes (GraderError when it cannot run, e.g. its key is not set)."""
    if isinstance(spec, StringCheckSpec):
        return StringCheckGrader(spec)
    if isinstance(spec, TextSimilaritySpec):
        return TextSimilarityGrader(spec)
    return ScoreModelGrader(spec)


def domain_graders(settings: Settings, domain: str, only: Collection[str] | None = None) -> list[Grader]:
    """The domain's configured graders, in lorag.toml's order ([] if none); `only`: just those named."""
    if domain not in settings.domains:
        raise GraderError(f"no domain named '{domain}' in lorag.toml")
    return [build_grader(spec) for spec in settings.domains[domain].graders if only is None or spec.name in only]


def grade_all(graders: Sequence[Grader], sample: str, item: Mapping[str, Any]) -> dict[str, float | None]:
    """grader name -> its score of `sample` (None: that grader could not grade it)."""
    return {grader.name: grader.grade(sample, item) for grader in graders}
