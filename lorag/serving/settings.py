"""Domain profiles in lorag.toml: what makes a domain answer like itself.

    [domains.legal]
    description = "Tenancy and contract law for consumers."
    adapter = "legal"                  # or "legal@v2"; absent = the base model
    system_prompt = "You are a careful legal assistant."
    api_keys = ["legal-team"]          # key names allowed; absent = any key scoped to it

    [domains.legal.knowledge]
    bases = ["statutes", "cases"]
    top_k = 4

    [domains.legal.examples]
    select = "similar"                 # or "fixed": the first k
    k = 2
    items = [{question = "...", answer = "..."}]

    [domains.legal.generation]
    temperature = 0.2
    max_tokens = 256
    max_tokens_limit = 1024

    [domains.legal.plugins]            # the same table as [plugins.domains.legal]
    enabled = ["pii", "formatting"]

    [domains.legal.tools]
    enabled = ["search_knowledge", "cite_statute"]

    [routing]                          # model: "auto"
    threshold = 0.2
    fallback = "general"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lorag.loop.grader_settings import GraderSpec, check_grader_names
from lorag.plugins.settings import NAME_RE, DomainPlugins
from lorag.schema import Strict

# Names a domain cannot take: they mean something else in the `model` field.
RESERVED_NAMES = ("auto",)


class DomainKnowledge(Strict):
    """Which knowledge bases a domain retrieves from, and how."""

    bases: list[str] = Field(default_factory=list)
    mode: Literal["vector", "keyword", "hybrid"] | None = None
    top_k: int | None = Field(default=None, ge=1, le=50)
    filters: dict[str, Any] | None = None
    score_threshold: float | None = None
    # At most this many prompt tokens of context (besides the fit to max_model_len).
    max_context_tokens: int | None = Field(default=None, gt=0)
    # "continue": answer without retrieval when the store fails, and say so in the response.
    on_error: Literal["fail", "continue"] = "fail"
    timeout_s: float = Field(default=10.0, gt=0, le=600)


class Example(Strict):
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class DomainExamples(Strict):
    """Few-shot examples put into the prompt (in-context learning)."""

    items: list[Example] = Field(default_factory=list)
    # JSONL of {"question", "answer"} lines, added after `items`.
    file: str | None = None
    select: Literal["fixed", "similar"] = "fixed"
    k: int = Field(default=2, ge=0, le=32)

    def all_items(self) -> list[Example]:
        """`items` plus the file's lines; read once at start-up (settings are immutable after)."""
        if not self.file:
            return list(self.items)
        path = Path(self.file).expanduser()
        examples = list(self.items)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    examples.append(Example.model_validate(json.loads(line)))
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: not a {{question, answer}} example: {err}") from None
        return examples


class GenerationDefaults(Strict):
    """Used where a request leaves the field out; `max_tokens_limit` caps what it may ask for."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_tokens_limit: int | None = Field(default=None, ge=1)
    stop: list[str] | None = None

    @model_validator(mode="after")
    def _default_within_limit(self) -> GenerationDefaults:
        if self.max_tokens and self.max_tokens_limit and self.max_tokens > self.max_tokens_limit:
            raise ValueError("max_tokens is above max_tokens_limit")
        return self


class DomainTools(Strict):
    """Server-side tools the model may call, run by lorag in a bounded loop."""

    enabled: list[str] = Field(default_factory=list)
    max_steps: int = Field(default=4, ge=1, le=32)
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    # vLLM tool parser to read tool calls from the model's text (e.g. "hermes", "llama3_json").
    parser: str = "hermes"


class DomainSettings(Strict):
    description: str = ""
    adapter: str | None = None
    system_prompt: str = ""
    knowledge: DomainKnowledge = Field(default_factory=DomainKnowledge)
    examples: DomainExamples = Field(default_factory=DomainExamples)
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)
    plugins: DomainPlugins | None = None
    tools: DomainTools = Field(default_factory=DomainTools)
    api_keys: list[str] | None = None
    # Stored completions: whether a request that leaves `store` out is stored, and for how long.
    store: bool = False
    store_retention_days: int | None = Field(default=None, ge=1, le=3650)
    # How the domain's answers are scored (`lorag eval`, the loop): OpenAI's grader schema.
    graders: list[GraderSpec] = Field(default_factory=list)

    _grader_names = field_validator("graders")(check_grader_names)

    @field_validator("adapter")
    @classmethod
    def _adapter_ref(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value.count("@") > 1):
            raise ValueError("expected an adapter name or name@version")
        return value


class RoutingSettings(Strict):
    """`model: "auto"`: the domain whose profile is most similar to the question."""

    # all-MiniLM-L6-v2: on-topic questions score about 0.25-0.55, unrelated ones below 0.2.
    threshold: float = Field(default=0.2, ge=-1, le=1)
    fallback: str | None = None
    # How many chunks of each knowledge base stand for it in the domain's profile.
    knowledge_hits: int = Field(default=3, ge=0, le=50)
    # Routing (an embedding and a knowledge search) past this goes to the fallback, or is a 503.
    timeout_s: float = Field(default=10.0, gt=0, le=600)


def check_domain_names(domains: dict[str, DomainSettings], base_model: str) -> None:
    for name in domains:
        if not NAME_RE.match(name) or "@" in name:
            raise ValueError(f"domains.{name}: not a domain name (letters, digits, '_', '-', '.')")
        if name in RESERVED_NAMES or name == base_model:
            raise ValueError(f"domains.{name}: this name is reserved (it already means something as a model)")
