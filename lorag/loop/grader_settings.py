"""`[[domains.NAME.graders]]`: how a domain's answers are scored, in OpenAI's grader schema.

    [[domains.legal.graders]]
    type = "string_check"               # or "text_similarity", "score_model"
    name = "says_yes"
    input = "{{sample.output_text}}"
    reference = "{{item.reference}}"
    operation = "ilike"

The shapes follow openai-python's `types/graders` (string_check, text_similarity,
score_model), so a grader written for OpenAI's evals or reinforcement fine-tuning reads
here unchanged; lorag adds `base_url`, `api_key_env` and `timeout_s` to score_model (the
judge may be any OpenAI-compatible endpoint) and `token_f1` / `exact_match` metrics.
Only the specs live here (layer 1, beside the other settings); lorag.evaluation.graders
runs them.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lorag.schema import Strict

# {{sample.output_text}}, {{item.FIELD}}: the only placeholders a template may hold.
PLACEHOLDER = re.compile(r"\{\{\s*(sample|item)\.([A-Za-z_]\w*)\s*\}\}")
_ANY_PLACEHOLDER = re.compile(r"\{\{.*?\}\}", re.DOTALL)
SAMPLE_FIELDS = ("output_text",)

# text_similarity metrics lorag computes (lorag.evaluation.graders.METRICS implements each).
SUPPORTED_METRICS = ("fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
                     "token_f1", "exact_match")
# OpenAI's metrics that lorag does not compute: named in the error so it does not read like a typo.
OPENAI_ONLY_METRICS = ("cosine", "gleu", "meteor")


def check_template(text: str) -> str:
    """Every `{{...}}` in `text` must be {{sample.output_text}} or {{item.FIELD}} (ValueError otherwise)."""
    for found in _ANY_PLACEHOLDER.findall(text):
        match = PLACEHOLDER.fullmatch(found)
        if match is None:
            raise ValueError(f"{found}: a placeholder is {{{{sample.output_text}}}} or {{{{item.FIELD}}}}")
        if match.group(1) == "sample" and match.group(2) not in SAMPLE_FIELDS:
            raise ValueError(f"{found}: the sample has only {', '.join(SAMPLE_FIELDS)}")
    return text


class _Grader(Strict):
    name: str = Field(min_length=1, max_length=64, description="Unique within the domain: the result's key.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
            raise ValueError("a grader name is letters, digits, '_', '.' and '-'")
        return value


class StringCheckSpec(_Grader):
    """1.0 when `input` and `reference` (both rendered) pass `operation`, else 0.0."""

    type: Literal["string_check"]
    input: str
    reference: str
    # eq / ne: equal / not equal; like: input contains reference; ilike: the same, ignoring case;
    # matches (lorag's, not OpenAI's): the whole input, stripped, matches the regular expression
    # `reference` (`lorag eval`'s format check: a two-line answer format, a JSON shape, ...).
    operation: Literal["eq", "ne", "like", "ilike", "matches"]

    _templates = field_validator("input", "reference")(check_template)

    @model_validator(mode="after")
    def _pattern_compiles(self) -> StringCheckSpec:
        if self.operation == "matches" and PLACEHOLDER.search(self.reference) is None:
            try:
                re.compile(self.reference)
            except re.error as err:
                raise ValueError(f"reference is not a regular expression: {err}") from None
        return self


class TextSimilaritySpec(_Grader):
    """A similarity metric of `input` against `reference`, 0-1 (BLEU scaled from sacrebleu's 0-100)."""

    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: str
    pass_threshold: float | None = Field(default=None, ge=0, le=1)

    _templates = field_validator("input", "reference")(check_template)

    @field_validator("evaluation_metric")
    @classmethod
    def _supported(cls, value: str) -> str:
        if value not in SUPPORTED_METRICS:
            kind = "an OpenAI metric lorag does not compute" if value in OPENAI_ONLY_METRICS else "unknown"
            raise ValueError(f"evaluation_metric {value!r} is {kind}; supported: {', '.join(SUPPORTED_METRICS)}")
        return value


class JudgeMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    type: Literal["message"] | None = None

    _template = field_validator("content")(check_template)


class SamplingParams(Strict):
    """OpenAI's grader sampling params; `max_tokens` is accepted for `max_completions_tokens`."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    max_completions_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_limit(self) -> SamplingParams:
        if self.max_tokens is not None and self.max_completions_tokens is not None:
            raise ValueError("give max_completions_tokens or max_tokens, not both")
        return self


class ScoreModelSpec(_Grader):
    """A judge model's score for the rendered messages: the first number of its reply (or JSON
    {"score": x} / {"result": x}), which must lie in `range`."""

    type: Literal["score_model"]
    model: str = Field(min_length=1)
    input: list[JudgeMessage] = Field(min_length=1)
    range: tuple[float, float] = (0.0, 1.0)
    sampling_params: SamplingParams | None = None
    # In the range's own units (like the score); graders compare it normalised.
    pass_threshold: float | None = None
    # lorag's: the judge's endpoint (None: the openai client's default, OPENAI_BASE_URL or OpenAI's API),
    # the environment variable that holds its key (None: no Authorization header), a per-call limit.
    base_url: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(default=60.0, gt=0, le=600)

    @model_validator(mode="after")
    def _threshold_in_range(self) -> ScoreModelSpec:
        low, high = self.range
        if not low < high:
            raise ValueError(f"range {list(self.range)}: the minimum must be below the maximum")
        if self.pass_threshold is not None and not low <= self.pass_threshold <= high:
            raise ValueError(f"pass_threshold {self.pass_threshold} is outside the range {list(self.range)}")
        return self


GraderSpec = Annotated[StringCheckSpec | TextSimilaritySpec | ScoreModelSpec, Field(discriminator="type")]


def item_fields(spec: GraderSpec) -> set[str]:
    """The item fields a spec's templates name: an evaluation set is checked for them before it runs."""
    texts = [m.content for m in spec.input] if isinstance(spec, ScoreModelSpec) else [spec.input, spec.reference]
    return {m.group(2) for text in texts for m in PLACEHOLDER.finditer(text) if m.group(1) == "item"}


def check_grader_names(graders: list[GraderSpec]) -> list[GraderSpec]:
    """A domain's grader names are the keys of its results: each may appear once."""
    names = [g.name for g in graders]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"grader names must be unique within a domain: {', '.join(repeated)} repeated")
    return graders
