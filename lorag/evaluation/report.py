"""An evaluation's results for people: a terminal table, JSON and CSV files, a chart, a recommendation.

The recommendation is computed from the numbers, never canned: the strategy with the best
token F1 (exact match, then latency, break ties), by how much it beats the runner-up on
the same items, whether that gap is larger than the noise of so few items (a paired
comparison: mean per-item difference against 1.96 standard errors), and what it costs in
latency against the base model. Where items carry a format, the format rate of the winner
(and of the strategy best at it, if another) is added. Items with a `subset` get the same
table rows and recommendation per subset, besides the one over all items.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorag.evaluation.dataset import ALL
from lorag.evaluation.noise import MIN_ITEMS, paired_difference
from lorag.evaluation.results import EvalRun, ItemResult, StrategySummary

# Best F1 under this: no strategy answers well; say so instead of crowning one.
POOR_F1 = 0.2

JSON_FILE = "results.json"
SUMMARY_CSV = "summary.csv"
ITEMS_CSV = "items.csv"
CHART_FILE = "quality_vs_latency.png"
# A grader's column in the CSV files (and its key in the table): "grade.NAME".
GRADE = "grade."
# A strategy this much faster (or more) than the winner, and not clearly worse, is worth naming.
CHEAPER_LATENCY = 0.8

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, summary field, format)
    ("strategy", "strategy", "s"),
    ("n", "items", "d"),
    ("EM", "exact_match", ".3f"),
    ("F1", "f1", ".3f"),
    ("ROUGE-L", "rouge_l", ".3f"),
    ("BLEU", "bleu", ".1f"),
    ("hit", "hit_rate", ".3f"),
    ("MRR", "mrr", ".3f"),
    ("schema", "schema_validity", ".3f"),
    ("format", "format_rate", ".3f"),
    ("p50 ms", "latency_ms_p50", ".1f"),
    ("p95 ms", "latency_ms_p95", ".1f"),
    ("prompt tok", "prompt_tokens_mean", ".1f"),
    ("compl tok", "completion_tokens_mean", ".1f"),
    ("errors", "errors", "d"),
)


# -- terminal ------------------------------------------------------------------------------


def table(summaries: Sequence[StrategySummary]) -> str:
    """Fixed-width columns, one row per strategy; '-' where a metric does not apply.

    When some rows are a subset's (see `all_summaries`), a first column names the subset; each of
    the domains' graders adds a column (its mean, headed by its name) before the errors."""
    columns: list[tuple[str, str, str]] = list(COLUMNS)
    if any(s.subset is not None for s in summaries):
        columns.insert(0, ("subset", "subset", "s"))
    columns[-1:-1] = [(name, GRADE + name, ".3f") for name in grader_names(summaries)]
    rows = [[header for header, _, _ in columns]]
    for summary in summaries:
        row = []
        for _, key, fmt in columns:
            value = summary.grades.get(key.removeprefix(GRADE)) if key.startswith(GRADE) else getattr(summary, key)
            if key == "subset":
                value = value or ALL
            row.append("-" if value is None else format(value, fmt))
        rows.append(row)
    left = 2 if columns[0][1] == "subset" else 1  # text columns, left-aligned
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def grader_names(rows: Sequence[StrategySummary | ItemResult]) -> list[str]:
    """Every grader in these rows, in the order first met (domains may have different ones)."""
    return list(dict.fromkeys(name for row in rows for name in row.grades))


def all_summaries(run: EvalRun) -> list[StrategySummary]:
    """The summaries over all items, then each subset's (in the order subsets first appear)."""
    rows = list(run.summaries)
    for subset in run.subsets:
        rows += run.for_subset(subset).summaries
    return rows


# -- recommendation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """The winner against one other strategy, on the items both answered."""

    best: StrategySummary
    other: StrategySummary
    items: int
    difference: float  # mean per-item F1 difference, best - other
    margin: float  # 1.96 standard errors of that mean (0 with no spread)

    @property
    def tie(self) -> bool:
        return math.isclose(self.difference, 0.0, abs_tol=1e-9)

    @property
    def within_noise(self) -> bool:
        return self.items < MIN_ITEMS or self.difference <= self.margin


def ranked(summaries: Sequence[StrategySummary]) -> list[StrategySummary]:
    """Best first: token F1, then exact match, then the lower median latency."""
    return sorted(summaries, key=lambda s: (-round(s.f1, 9), -round(s.exact_match, 9), s.latency_ms_p50))


def compare(run: EvalRun, best: StrategySummary, other: StrategySummary) -> Comparison:
    mine = {r.line: r for r in run.results_for(best.strategy)}
    theirs = {r.line: r for r in run.results_for(other.strategy)}
    shared = sorted(mine.keys() & theirs.keys())
    diffs = [mine[line].f1 - theirs[line].f1 for line in shared]
    mean, margin = paired_difference(diffs)
    return Comparison(best, other, len(diffs), mean, margin)


def recommendation(run: EvalRun) -> str:
    """One paragraph: which strategy, by how much, at what cost, and how sure."""
    order = ranked(run.summaries)
    if not order:
        return "Nothing was evaluated."
    best = order[0]
    if len(order) == 1:
        return (f"Only {best.strategy} was evaluated: F1 {best.f1:.2f}, exact match {best.exact_match:.2f} "
                f"on {best.items} items. Run more strategies to compare.")
    if best.f1 < POOR_F1:
        return (f"No strategy answers this data well: the best, {best.strategy}, reaches F1 {best.f1:.2f}. "
                "Check the reference answers, the knowledge bases and the adapter before choosing.")
    tied = [s for s in order[1:] if compare(run, best, s).tie]
    if tied:
        rest = [s for s in order[1:] if s not in tied]
        text = _tie(best, tied, compare(run, best, rest[0]) if rest else None) + _cost(run, best) + "."
        text += _format_note(run, best)
        if best.items < 2 * MIN_ITEMS:
            text += f" Only {best.items} items: treat this as a hint and evaluate on more."
        return text
    runner_up = compare(run, best, order[1])
    text = _verdict(runner_up) + _cost(run, best) + "."
    if runner_up.within_noise:
        cheaper = _cheaper_alternative(run, best, order[1:])
        if cheaper:
            text += " " + cheaper
    text += _format_note(run, best)
    if best.items < 2 * MIN_ITEMS:
        text += f" Only {best.items} items: treat this as a hint and evaluate on more."
    return text


def subset_recommendations(run: EvalRun) -> dict[str, str]:
    """subset -> its recommendation, computed on that subset's items alone."""
    return {subset: recommendation(run.for_subset(subset)) for subset in run.subsets}


def _format_note(run: EvalRun, best: StrategySummary) -> str:
    """The winner's format rate where items have a format, and the strategy best at it if another one is."""
    if best.format_rate is None:
        return ""
    rated = [s for s in run.summaries if s.format_rate is not None]
    top = max(rated, key=lambda s: s.format_rate or 0.0)
    text = f" Format: {best.format_rate:.0%} of {best.strategy}'s answers match the expected format"
    if (top.format_rate or 0.0) > best.format_rate:
        text += f", {top.format_rate:.0%} of {top.strategy}'s"
    return text + "."


def _tie(best: StrategySummary, tied: Sequence[StrategySummary], next_best: Comparison | None) -> str:
    """Several strategies with the same F1, how far ahead of the next they are; the first is named."""
    names = [best.strategy, *(s.strategy for s in tied)]
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    ahead = ""
    if next_best is not None:
        noise = ", within noise" if next_best.within_noise else ""
        ahead = (f", ahead of {next_best.other.strategy} (F1 {next_best.other.f1:.2f}, "
                 f"{_signed(next_best.difference)}{noise})")
    ahead_on_em = any(best.exact_match > s.exact_match for s in tied)
    why = "ahead on exact match" if ahead_on_em else "the faster" if len(tied) == 1 else "the fastest of them"
    return f"{listed} tie on this data (F1 {best.f1:.2f}){ahead}; {best.strategy} is {why}"


def _verdict(c: Comparison) -> str:
    best, other = c.best, c.other
    scores = f"F1 {best.f1:.2f} vs {other.f1:.2f} for {other.strategy}"
    if c.items < MIN_ITEMS:
        return (f"{best.strategy} leads on this data ({scores}, {_signed(c.difference)}), but {c.items} shared "
                f"item{'s are' if c.items != 1 else ' is'} too few to tell them apart")
    if c.within_noise:
        return (f"{best.strategy} leads on this data ({scores}, {_signed(c.difference)}), but the gap is within "
                f"noise on {c.items} items (±{c.margin:.2f})")
    return f"{best.strategy} wins on this data: {scores} ({_signed(c.difference)})"


def _cost(run: EvalRun, best: StrategySummary) -> str:
    """Latency against base (or the fastest strategy when base was not run)."""
    reference = run.summary("base") or min(run.summaries, key=lambda s: s.latency_ms_p50)
    if reference.strategy == best.strategy:
        fastest = min(run.summaries, key=lambda s: s.latency_ms_p50)
        if fastest.strategy == best.strategy:
            return f", and it is the fastest (median {best.latency_ms_p50:.0f} ms)"
        return f", at {_ratio(best, fastest)} the latency of {fastest.strategy}"
    return (f", at {_ratio(best, reference)} the latency of {reference.strategy} "
            f"(median {best.latency_ms_p50:.0f} ms vs {reference.latency_ms_p50:.0f} ms)")


def _cheaper_alternative(run: EvalRun, best: StrategySummary, others: Sequence[StrategySummary]) -> str:
    """A clearly faster strategy the winner does not clearly beat, if there is one.

    Clearly faster: at most CHEAPER_LATENCY of the winner's median. Medians a few percent
    apart are as noisy as F1 on twenty items, and trading quality for them is no advice.
    """
    for other in sorted(others, key=lambda s: s.latency_ms_p50):
        if other.latency_ms_p50 > CHEAPER_LATENCY * best.latency_ms_p50:
            break
        if compare(run, best, other).within_noise:
            return (f"{other.strategy} is not clearly worse (F1 {other.f1:.2f}) and costs "
                    f"{_ratio(other, best)} the latency: prefer it unless more data says otherwise.")
    return ""


def _ratio(a: StrategySummary, b: StrategySummary) -> str:
    if b.latency_ms_p50 <= 0:
        return "n/a x"
    return f"{a.latency_ms_p50 / b.latency_ms_p50:.1f}x"


def _signed(value: float) -> str:
    return f"{value:+.2f}"


# -- files -----------------------------------------------------------------------------------


def write_json(run: EvalRun, path: Path, advice: str) -> None:
    subsets = {}
    for subset in run.subsets:
        part = run.for_subset(subset)
        subsets[subset] = {
            "strategies": [s.to_dict() for s in part.summaries],
            "ranking": [s.strategy for s in ranked(part.summaries)],
            "recommendation": recommendation(part),
        }
    data = {
        "meta": run.meta,
        "strategies": [s.to_dict() for s in run.summaries],
        "ranking": [s.strategy for s in ranked(run.summaries)],
        "recommendation": advice,
        "subsets": subsets,
        "notes": run.notes,
        "items": [r.to_dict() for r in run.items],
    }
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_summary_csv(summaries: Sequence[StrategySummary], path: Path) -> None:
    rows = [_flat_grades(s.to_dict(), grader_names(summaries)) for s in summaries]
    _write_csv(path, list(rows[0]) if rows else [], rows)


def write_items_csv(items: Sequence[ItemResult], path: Path) -> None:
    rows = []
    names = grader_names(items)
    for result in items:
        row = _flat_grades(result.to_dict(), names)
        row["references"] = " | ".join(result.references)
        row["cited_sources"] = " | ".join(result.cited_sources)
        rows.append(row)
    _write_csv(path, list(rows[0]) if rows else [], rows)


def _flat_grades(row: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """A CSV row: one `grade.NAME` column per grader of the file (empty where it did not grade)."""
    grades = row.pop("grades")
    return row | {GRADE + name: grades.get(name) for name in names}


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def write_chart(summaries: Sequence[StrategySummary], path: Path) -> None:
    """Token F1 against median latency, one labelled point per strategy (upper left is best)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    span = max([s.latency_ms_p50 for s in summaries] + [1.0])
    try:
        for i, summary in enumerate(summaries):
            # Labels of points close to an earlier one go below it instead of on top of each other.
            near = sum(1 for other in summaries[:i] if abs(other.latency_ms_p50 - summary.latency_ms_p50) < 0.08 * span
                       and abs(other.f1 - summary.f1) < 0.05)
            ax.scatter(summary.latency_ms_p50, summary.f1, s=60)
            ax.annotate(summary.strategy, (summary.latency_ms_p50, summary.f1), textcoords="offset points",
                        xytext=(6, 6 - 13 * near), fontsize=9)
        ax.set_xlabel("median latency per question (ms)")
        ax.set_ylabel("token F1")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlim(left=0, right=span * 1.25)
        ax.grid(True, alpha=0.3)
        ax.set_title("Quality against latency per strategy")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def write_all(run: EvalRun, out_dir: Path, advice: str) -> dict[str, Path]:
    """Every result file into `out_dir`; returns what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / name for name in (JSON_FILE, SUMMARY_CSV, ITEMS_CSV, CHART_FILE)}
    write_json(run, files[JSON_FILE], advice)
    write_summary_csv(all_summaries(run), files[SUMMARY_CSV])
    write_items_csv(run.items, files[ITEMS_CSV])
    write_chart(run.summaries, files[CHART_FILE])
    return files
