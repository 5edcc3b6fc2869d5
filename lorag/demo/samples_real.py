"""The sample exchanges `lorag demo` prints on the real model, through the real server.

The point is the product's question: for a domain, does the adapter, retrieval, or both
answer best? So the first section asks questions no adapter was trained on, four ways,
and marks each answer honestly: does it hold the fact (only the knowledge base has it),
and does it have the domain's answer style (only the adapter teaches it)?
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import click
import httpx

from lorag.demo.samples import PII_INPUT, Samples, clip, heading, note, print_usage
from lorag.demo.setup import DATA

WIDTH = 100


@dataclass(frozen=True)
class Probe:
    """An unseen question, the fact a right answer holds, and the domain's style."""

    domain: str
    question: str
    fact: str  # a regular expression a right answer matches (case-insensitive)


# Questions in no training file and not in the eval set, whose facts only the knowledge bases hold.
PROBES = (
    Probe("legal", "From which day of sickness do I need a sick note?", r"\b4th\b|\bfourth\b|\b4 days?\b"),
    Probe("legal", "How much does it cost to file a small claim?", r"\b35\b|thirty-five"),
    Probe("medical", "When is the clinic open on Saturdays?", r"\b9(:00)?\b.*\b12(:00)?\b|nine.*(noon|twelve)"),
    Probe("medical", "How often are dressings changed at the minor injuries unit?",
          r"\b(two|2) days\b|every other day|48 hours"),
)
# The four ways, as per-request `lorag` options on the same domain.
WAYS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("base model", {"adapter": "none", "no_retrieval": True, "examples": 0}),
    ("adapter alone", {"no_retrieval": True, "examples": 0}),
    ("base + RAG", {"adapter": "none", "examples": 0}),
    ("whole domain", {}),
)


def has_fact(text: str, probe: Probe) -> bool:
    return re.search(probe.fact, text, re.IGNORECASE) is not None


@lru_cache(maxsize=1)
def style_patterns() -> dict[str, str]:
    """Each domain's answer format, exactly as the bundled eval set checks it (its `style` items)."""
    from lorag.evaluation.dataset import load_eval_set

    patterns: dict[str, str] = {}
    for item in load_eval_set(DATA / "eval.jsonl"):
        if item.subset == "style" and item.domain and item.format:
            patterns.setdefault(item.domain, item.format)
    return patterns


def has_style(text: str, domain: str) -> bool:
    from lorag.evaluation.metrics import format_match

    return format_match(text, style_patterns()[domain])


class RealSamples(Samples):
    """Each method prints one section."""

    def four_ways(self) -> list[dict[str, Any]]:
        heading("1. Four ways to answer a question no adapter was trained on")
        note("Same domain, same question, greedy. Only the per-request `lorag` options differ:\n"
             + "\n".join(f"  {name:<14}lorag: {json.dumps(options)}" for name, options in WAYS)
             + "\nfact: the answer holds the fact only the knowledge base has; style: the domain's answer\n"
               "format, which only its adapter learned.")
        scores: list[dict[str, Any]] = []
        for probe in PROBES:
            click.echo(f"\n  {probe.domain}  Q: {probe.question}")
            for name, options in WAYS:
                text, info = self.ask(probe.domain, probe.question, options, max_tokens=80)
                fact, style = has_fact(text, probe), has_style(text, probe.domain)
                scores.append({"way": name, "fact": fact, "style": style})
                answer(name, text, fact, style)
            for cite in info.get("citations", []):
                where = Path(cite["source"]).name + (f" > {cite['location'].split(' > ')[-1]}" if cite.get("location") else "")
                click.echo(f"    {'':<16}[{cite['index']}] {cite['kb']}: {where} (score {cite['score']:.2f})")
        return scores

    def pii(self) -> None:
        heading("2. PII redaction: the medical domain runs the pii plugin")
        text, _ = self.ask("medical", PII_INPUT, {"no_retrieval": True}, max_tokens=60)
        click.echo(f"\n  Q: {PII_INPUT}")
        answer("medical", text)
        note("\nThe model only ever saw [EMAIL_1] and [PHONE_1]: the input was redacted before it, and\n"
             "anything that looks like contact data in the output is redacted on its way out.")


def answer(label: str, text: str, fact: bool | None = None, style: bool | None = None) -> None:
    """An answer under its label, with its marks; multi-line answers keep their lines."""
    marks = ""
    if fact is not None and style is not None:
        marks = f"fact {'✓' if fact else '✗'} style {'✓' if style else '✗'}  "
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or ["''"]
    for number, line in enumerate(lines[:4]):
        head = f"{label:<16}{marks}" if number == 0 else " " * (16 + len(marks))
        click.echo(f"    {head}{clip(line, WIDTH - 4 - len(head))}")


def tally(scores: list[dict[str, Any]]) -> None:
    """What the first section showed, counted per way: the honest summary."""
    heading("What the samples showed")
    click.echo()
    for name, _ in WAYS:
        mine = [s for s in scores if s["way"] == name]
        facts, styles = sum(s["fact"] for s in mine), sum(s["style"] for s in mine)
        click.echo(f"  {name:<14} fact {facts}/{len(mine)}  style {styles}/{len(mine)}")
    note("\nA 135M model is small: it reads short contexts well and follows a trained format, but it\n"
         "slips. `lorag eval lorag/demo/data/eval.jsonl` measures the same four ways (and two more)\n"
         "on 60+ questions; the README shows a run.")


def print_samples(url: str, config: Path | None = None) -> None:
    with httpx.Client(base_url=url, timeout=600) as http:
        samples = RealSamples(http)
        scores = samples.four_ways()
        samples.pii()
        samples.json_schema(3, DATA)
        samples.routing(4)
    tally(scores)
    print_usage(url, config,
                openai_call='model="auto", messages=[{"role": "user", "content": "Can my landlord enter without notice?"}])',
                chat='-m medical "What should I do about a mild fever?"',
                last_command="eval lorag/demo/data/eval.jsonl --concurrency 4",
                epilogue="")
