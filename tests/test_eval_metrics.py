"""`lorag eval` without an engine: metrics against reference values, the data file, strategies, the report."""

from __future__ import annotations

import csv
import json
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorag.config import load_settings
from lorag.evaluation import metrics, report
from lorag.evaluation.dataset import EvalDataError, EvalItem, load_eval_set
from lorag.evaluation.results import EvalRun, ItemResult, score, summarise
from lorag.evaluation.runner import (
    STRATEGIES,
    EvalError,
    assign_domains,
    parse_strategies,
    plan_runs,
)

# -- SQuAD: the official evaluation script's functions (v1.1, F1's empty case from v2.0) as the oracle.


def squad_normalize(s: str) -> str:
    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_f1(prediction: str, ground_truth: str) -> float:
    prediction_tokens = squad_normalize(prediction).split()
    ground_truth_tokens = squad_normalize(ground_truth).split()
    if len(prediction_tokens) == 0 or len(ground_truth_tokens) == 0:
        return float(prediction_tokens == ground_truth_tokens)
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def test_squad_exact_match_and_f1_on_known_examples() -> None:
    assert metrics.normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"
    assert metrics.exact_match("Denver Broncos", ["Denver Broncos"]) == 1.0
    assert metrics.exact_match("the Denver Broncos.", ["Denver Broncos"]) == 1.0  # article, punctuation
    assert metrics.exact_match("Broncos", ["Denver Broncos"]) == 0.0
    # SQuAD takes the best of several references.
    assert metrics.exact_match("Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    # Hand-computed: "cat sat" vs "cat sat on mat": P = 2/2, R = 2/4, F1 = 2/3.
    assert metrics.token_f1("the cat sat", ["a cat sat on the mat"]) == pytest.approx(2 / 3)
    # Repeated tokens count as often as both sides have them: common {x: 1, y: 1}, P = R = 2/3.
    assert metrics.token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert metrics.token_f1("Santa Clara", ["Levi's Stadium"]) == 0.0
    assert metrics.token_f1("", [""]) == 1.0 and metrics.token_f1("", ["an answer"]) == 0.0
    assert metrics.token_f1("the", ["a"]) == 1.0  # both normalise to nothing


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abc ,.!'AThe", max_size=30), st.text(alphabet="abc ,.!'AThe", max_size=30))
def test_squad_metrics_agree_with_the_official_script(prediction: str, reference: str) -> None:
    assert metrics.normalize_answer(reference) == squad_normalize(reference)
    assert metrics.token_f1(prediction, [reference]) == pytest.approx(squad_f1(prediction, reference))
    assert metrics.exact_match(prediction, [reference]) == float(squad_normalize(prediction) == squad_normalize(reference))


def test_rouge_l_is_the_lcs_f_measure() -> None:
    # Lin (2004), section 3: reference "police killed the gunman".
    # "police kill the gunman": LCS "police the gunman" = 3 of 4 words each side -> F = 0.75.
    assert metrics.rouge_l("police kill the gunman", ["police killed the gunman"]) == pytest.approx(0.75)
    # "the gunman kill police": LCS "the gunman" = 2 -> F = 0.5.
    assert metrics.rouge_l("the gunman kill police", ["police killed the gunman"]) == pytest.approx(0.5)
    # Unequal lengths: LCS "a c" = 2; P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7.
    assert metrics.rouge_l("a x c", ["a b c d"]) == pytest.approx(4 / 7)
    assert metrics.rouge_l("completely different", ["nothing shared"]) == 0.0
    assert metrics.rouge_l("a b", ["zzz", "a b"]) == 1.0  # best reference


def test_bleu_matches_sacrebleus_documented_example() -> None:
    # sacrebleu's README: "BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)".
    predictions = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    references = [["The dog bit the man.", "The dog had bit the man."],
                  ["It was not unexpected.", "No one was surprised."],
                  ["The man bit him first.", "The man had bitten the dog."]]
    assert metrics.corpus_bleu(predictions, references) == pytest.approx(48.53, abs=0.005)
    assert metrics.sentence_bleu("The dog bit the man.", ["The dog bit the man."]) == pytest.approx(100.0)
    assert metrics.sentence_bleu("", ["a b c"]) == 0.0
    # Items with fewer references than others are padded, not refused.
    assert metrics.corpus_bleu(["a b c d", "e f g h"], [["a b c d"], ["x", "e f g h"]]) == pytest.approx(100.0)
    assert metrics.corpus_bleu([], []) == 0.0


def test_retrieval_hit_and_reciprocal_rank() -> None:
    cited = ["/srv/docs/a.md", "upload:b.txt", "/srv/docs/c.pdf"]
    assert metrics.reciprocal_rank(cited, ["a.md"]) == 1.0  # file name
    assert metrics.reciprocal_rank(cited, ["b.txt"]) == 0.5  # uploads match by their file name too
    assert metrics.reciprocal_rank(cited, ["/srv/docs/c.pdf"]) == pytest.approx(1 / 3)  # full path
    assert metrics.reciprocal_rank(cited, ["/other/c.pdf"]) == 0.0  # a different full path is another file
    assert metrics.reciprocal_rank(cited, ["c.pdf", "b.txt"]) == 0.5  # the first relevant one counts
    assert metrics.retrieval_hit(cited, ["zzz.md"]) == 0.0 and metrics.retrieval_hit([], ["a.md"]) == 0.0


def test_schema_validity() -> None:
    schema = {"type": "object", "properties": {"days": {"type": "integer"}}, "required": ["days"]}
    assert metrics.schema_valid('{"days": 30}', schema)
    assert metrics.schema_valid('```json\n{"days": 30}\n```', schema)
    assert not metrics.schema_valid('{"days": "thirty"}', schema)
    assert not metrics.schema_valid("thirty days", schema)
    assert not metrics.schema_valid('{"days": 30', schema)


def test_format_is_a_full_match_of_the_stripped_answer() -> None:
    legal = r"Short answer: [^\n]+\nWhy: [^\n]+"
    assert metrics.format_match("Short answer: Yes [1].\nWhy: The Act says so.", legal)
    assert metrics.format_match("  Short answer: Yes.\nWhy: Because.\n", legal)  # surrounding whitespace
    assert not metrics.format_match("Yes, it is.", legal)
    assert not metrics.format_match("Short answer: Yes.\nWhy: Because.\nAlso: more.", legal)  # whole answer
    assert not metrics.format_match("Well. Short answer: Yes.\nWhy: Because.", legal)
    assert metrics.format_match("a\nb", "(?s)a.b") and not metrics.format_match("a\nb", "a.b")  # flags inline


def test_percentile_is_numpys_linear_interpolation() -> None:
    import numpy as np

    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 25, 50, 90, 95, 100):
        assert metrics.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert metrics.percentile([], 50) is None


# -- the data file ---------------------------------------------------------------------------


def test_eval_set_errors_name_each_line(tmp_path: Path) -> None:
    lines = [
        json.dumps({"question": "Q1?", "answer": "A1", "sources": ["a.md"], "domain": "legal", "id": "q1"}),  # 1
        '{"question": "Q2?"',                                                                  # 2 bad JSON
        json.dumps({"answer": "A3"}),                                                          # 3 no question
        json.dumps({"question": "Q4?"}),                                                       # 4 no answer
        json.dumps({"question": "Q5?", "answer": 5}),                                          # 5 wrong type
        "",                                                                                    # 6 blank
        json.dumps({"question": "Q7?", "answer": "A", "schema": {"type": "objekt"}}),          # 7 bad schema
        json.dumps({"question": "Q8?", "answer": "A", "sorces": ["x"]}),                       # 8 typo'd field
        json.dumps({"question": "Q9?", "answer": "A", "sources": "a.md", "schema": {"type": "object"}}),  # 9 fine
        json.dumps(["a list"]),                                                                # 10
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalDataError) as caught:
        load_eval_set(data)
    message = str(caught.value)
    assert message.startswith(f"{data}: 7 problems in the evaluation data:")
    expected = {2: "not valid JSON", 3: "has no 'question'", 4: "has no 'answer'", 5: "'answer' must be a string",
                7: "'schema' is not a valid JSON schema", 8: "unknown field 'sorces'", 10: "expected a JSON object"}
    for number, what in expected.items():
        assert any(line.strip().startswith(f"line {number}:") and what in line for line in message.splitlines()), \
            (number, message)
    for fine in (1, 6, 9):
        assert f"line {fine}:" not in message

    good = tmp_path / "good.jsonl"
    good.write_text(lines[0] + "\n\n" + lines[8] + "\n")
    first, second = load_eval_set(good)
    assert first == EvalItem(line=1, question="Q1?", answers=("A1",), sources=("a.md",), domain="legal", id="q1")
    assert first.name == "q1" and second.name == "line 3" and second.sources == ("a.md",)
    assert second.schema == {"type": "object"}

    extra = tmp_path / "extra.jsonl"
    extra.write_text("\n".join([
        json.dumps({"question": "Q?", "answer": "A", "subset": "style", "format": "[^\\n]+\\nWhy: .+"}),  # 1
        json.dumps({"question": "Q?", "answer": "A", "format": "(unclosed"}),                          # 2
        json.dumps({"question": "Q?", "answer": "A", "subset": "all"}),                                 # 3
        json.dumps({"question": "Q?", "answer": "A", "subset": ""}),                                    # 4
    ]) + "\n")
    with pytest.raises(EvalDataError) as caught:
        load_eval_set(extra)
    message = str(caught.value)
    assert "line 2: 'format' is not a valid regular expression" in message
    assert "line 3: 'subset' may not be 'all'" in message and "line 4: 'subset' must be a non-empty string" in message
    assert "line 1:" not in message
    extra.write_text(extra.read_text().splitlines()[0] + "\n")
    (styled,) = load_eval_set(extra)
    assert styled.subset == "style" and styled.format == "[^\\n]+\\nWhy: .+"

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(EvalDataError, match="holds no questions"):
        load_eval_set(empty)


# -- strategies ------------------------------------------------------------------------------------


def test_strategies_are_request_overrides() -> None:
    overrides = {name: s.overrides() for name, s in STRATEGIES.items()}
    assert overrides == {
        "base": {"adapter": "none", "no_retrieval": True, "examples": 0},
        "icl": {"adapter": "none", "no_retrieval": True},
        "rag": {"adapter": "none", "examples": 0},
        "adapter": {"no_retrieval": True, "examples": 0},
        "adapter+rag": {"examples": 0},
        "adapter+rag+icl": {},
    }
    assert [s.name for s in parse_strategies(" rag, base,rag ")] == ["rag", "base"]
    with pytest.raises(EvalError, match="unknown strategy 'lora'; choose from base, icl, rag"):
        parse_strategies("base,lora")


def _settings(tmp_path: Path):
    config = tmp_path / "lorag.toml"
    config.write_text("""
[model]
path = "/models/x"
[domains.full]
adapter = "full"
[domains.full.knowledge]
bases = ["kb"]
[domains.full.examples]
items = [{question = "q", answer = "a"}]
[domains.bare]
""")
    return load_settings(config)


def test_plan_skips_what_a_domain_lacks(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    items = [EvalItem(line=1, question="q1", answers=("a",), domain="full"),
             EvalItem(line=2, question="q2", answers=("a",))]
    domains = assign_domains(items, "bare", settings)
    assert domains == {1: "full", 2: "bare"}
    plan = plan_runs(items, list(STRATEGIES.values()), domains, settings)
    runs = {s.name: [i.line for i in todo] for s, todo in plan.runs}
    assert runs == {"base": [1, 2], "icl": [1], "rag": [1], "adapter": [1], "adapter+rag": [1], "adapter+rag+icl": [1]}
    assert plan.requests == 7
    assert "icl: not run for domain 'bare', which has no few-shot examples" in plan.notes
    assert "adapter+rag: not run for domain 'bare', which has no adapter or knowledge bases" in plan.notes
    assert "adapter+rag+icl: not run for domain 'bare', which has no adapter, knowledge bases or few-shot examples" \
        in plan.notes
    with pytest.raises(EvalError, match="no domain for this question; pass --domain"):
        assign_domains(items, None, settings)
    with pytest.raises(EvalError, match="line 2: no domain named 'nope'"):
        assign_domains(items, "nope", settings)
    with pytest.raises(EvalError, match="no strategy can run"):
        plan_runs(items[1:], [STRATEGIES["rag"]], domains, settings)


# -- results and the report ------------------------------------------------------------------------


def _result(strategy: str, line: int, f1: float, latency: float, **extra) -> ItemResult:
    result = ItemResult(strategy=strategy, item=f"line {line}", line=line, domain="d", question=f"q{line}",
                        references=["a b"], prediction="a b" if f1 == 1 else "x", latency_ms=latency, **extra)
    result.f1 = result.exact_match = f1
    return result


def _run(scores: dict[str, tuple[list[float], float]]) -> EvalRun:
    items = [_result(name, line, f1, latency) for name, (f1s, latency) in scores.items()
             for line, f1 in enumerate(f1s, start=1)]
    return EvalRun(meta={}, items=items,
                   summaries=[summarise(name, [r for r in items if r.strategy == name]) for name in scores])


def test_scoring_and_summary() -> None:
    item = EvalItem(line=3, question="q", answers=("Thirty days",), sources=("lease.md",),
                    schema={"type": "string"})
    good = ItemResult("rag", "line 3", 3, "d", "q", ["Thirty days"], prediction='"Thirty days"',
                      cited_sources=["/kb/other.md", "/kb/lease.md"], latency_ms=10, prompt_tokens=50,
                      completion_tokens=4)
    score(good, item, retrieves=True)
    assert good.exact_match == 1.0 and good.f1 == 1.0 and good.reciprocal_rank == 0.5 and good.hit == 1.0
    assert good.schema_valid is True
    failed = ItemResult("rag", "line 4", 4, "d", "q", ["Thirty days"], error="context too long", latency_ms=30)
    score(failed, item, retrieves=True)
    assert failed.f1 == 0.0 and failed.hit == 0.0 and failed.schema_valid is False
    no_retrieval = score(ItemResult("base", "line 3", 3, "d", "q", ["Thirty days"], prediction="x"), item,
                         retrieves=False)
    assert no_retrieval.hit is None and no_retrieval.reciprocal_rank is None
    summary = summarise("rag", [good, failed])
    assert summary.items == 2 and summary.errors == 1 and summary.f1 == 0.5 and summary.hit_rate == 0.5
    assert summary.mrr == 0.25 and summary.schema_validity == 0.5 and summary.latency_ms_p50 == 20.0
    assert summary.prompt_tokens_mean == 25.0 and summary.completion_tokens_mean == 2.0
    assert summary.format_rate is None and summary.subset is None and summary.to_dict()["subset"] == "all"

    styled = EvalItem(line=5, question="q", answers=("Thirty days [1].\nSafety: call us.",),
                      format=r"[^\n]+\nSafety: [^\n]+", subset="mixed")
    right = score(ItemResult("adapter", "line 5", 5, "d", "q", list(styled.answers),
                             prediction="Thirty days [1].\nSafety: call us.", subset="mixed"), styled, retrieves=False)
    plain = score(ItemResult("base", "line 5", 5, "d", "q", list(styled.answers), prediction="Thirty days.",
                             subset="mixed"), styled, retrieves=False)
    broken = score(ItemResult("rag", "line 5", 5, "d", "q", list(styled.answers), error="failed"), styled,
                   retrieves=False)
    assert right.format_ok is True and plain.format_ok is False and broken.format_ok is False
    assert no_retrieval.format_ok is None  # the item has no format
    assert summarise("adapter", [right, plain], subset="mixed").format_rate == 0.5
    assert summarise("adapter", [right, plain], subset="mixed").to_dict()["subset"] == "mixed"


def test_recommendation_names_the_winner_margin_and_cost() -> None:
    run = _run({"base": ([0.0] * 12, 10.0), "rag": ([1.0] * 6 + [0.0] * 6, 12.0),
                "adapter+rag": ([1.0] * 12, 13.0)})
    advice = report.recommendation(run)
    assert advice.startswith("adapter+rag wins on this data: F1 1.00 vs 0.50 for rag (+0.50), "
                             "at 1.3x the latency of base (median 13 ms vs 10 ms).")
    assert report.ranked(run.summaries)[0].strategy == "adapter+rag"


def test_recommendation_says_when_it_cannot_tell() -> None:
    # One item different in twelve: within noise, and the faster strategy is offered instead.
    close = _run({"base": ([0.0] * 12, 10.0), "adapter": ([1.0] * 11 + [0.0], 11.0),
                  "adapter+rag": ([1.0] * 12, 20.0)})
    advice = report.recommendation(close)
    assert "adapter+rag leads on this data (F1 1.00 vs 0.92 for adapter, +0.08), but the gap is within noise " \
           "on 12 items" in advice
    assert "adapter is not clearly worse (F1 0.92) and costs 0.6x the latency" in advice
    # A runner-up only a little faster is no reason to give up the lead.
    barely = _run({"base": ([0.0] * 12, 10.0), "adapter": ([1.0] * 11 + [0.0], 19.0),
                   "adapter+rag": ([1.0] * 12, 20.0)})
    assert "within noise" in report.recommendation(barely)
    assert "not clearly worse" not in report.recommendation(barely)
    tie = _run({"base": ([0.0] * 12, 10.0), "adapter": ([1.0] * 12, 11.0), "adapter+rag": ([1.0] * 12, 20.0),
                "rag": ([1.0] * 12, 15.0)})
    assert report.recommendation(tie) == ("adapter, rag and adapter+rag tie on this data (F1 1.00), ahead of base "
                                          "(F1 0.00, +1.00); adapter is the fastest of them, at 1.1x the latency of base "
                                          "(median 11 ms vs 10 ms).")
    few = _run({"base": ([0.0] * 3, 10.0), "rag": ([1.0] * 3, 12.0)})
    advice = report.recommendation(few)
    assert "3 shared items are too few to tell them apart" in advice and "Only 3 items" in advice
    poor = _run({"base": ([0.0] * 12, 10.0), "rag": ([0.1] * 12, 12.0)})
    assert report.recommendation(poor).startswith("No strategy answers this data well")


def test_report_files_and_table(tmp_path: Path) -> None:
    run = _run({"base": ([0.0, 1.0], 10.0), "rag": ([1.0, 1.0], 12.5)})
    run.notes.append("icl: not run")
    files = report.write_all(run, tmp_path / "out", "advice")
    saved = json.loads(files[report.JSON_FILE].read_text())
    assert saved["ranking"] == ["rag", "base"] and saved["recommendation"] == "advice"
    assert saved["notes"] == ["icl: not run"] and len(saved["items"]) == 4
    with files[report.SUMMARY_CSV].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["strategy"] for r in rows] == ["base", "rag"] and rows[1]["f1"] == "1.0" and rows[0]["hit_rate"] == ""
    with files[report.ITEMS_CSV].open() as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert files[report.CHART_FILE].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.table(run.summaries)
    header, rule, base, rag = text.splitlines()
    assert header.split()[:4] == ["strategy", "n", "EM", "F1"] and set(rule) <= {"-", " "}
    assert base.split()[:4] == ["base", "2", "0.500", "0.500"] and rag.split()[3] == "1.000"
    assert " - " in base  # hit rate does not apply


def _subset_run() -> EvalRun:
    """Two subsets: rag answers the 'knowledge' half, adapter the 'style' half (and only it keeps the format)."""
    items = []
    for strategy, latency in (("base", 10.0), ("rag", 12.0), ("adapter", 11.0)):
        for line in range(1, 25):
            subset = "knowledge" if line <= 12 else "style"
            right = (strategy == "rag" and subset == "knowledge") or (strategy == "adapter" and subset == "style")
            result = _result(strategy, line, 1.0 if right else 0.0, latency, subset=subset)
            if subset == "style":
                result.format_ok = strategy == "adapter"
            items.append(result)
    return EvalRun(meta={}, items=items,
                   summaries=[summarise(name, [r for r in items if r.strategy == name]) for name in ("base", "rag", "adapter")])


def test_subsets_get_their_own_rows_and_recommendation(tmp_path: Path) -> None:
    run = _subset_run()
    assert run.subsets == ["knowledge", "style"]
    knowledge = run.for_subset("knowledge")
    assert [s.strategy for s in knowledge.summaries] == ["base", "rag", "adapter"]
    assert {s.subset for s in knowledge.summaries} == {"knowledge"} and knowledge.summary("rag").f1 == 1.0
    assert knowledge.summary("rag").format_rate is None and run.for_subset("style").summary("adapter").format_rate == 1.0

    advice = report.subset_recommendations(run)
    assert advice["knowledge"].startswith("rag wins on this data: F1 1.00 vs 0.00")
    assert advice["style"].startswith("adapter wins on this data: F1 1.00 vs 0.00")
    assert "Format: 100% of adapter's answers match the expected format." in advice["style"]
    # Over all items, rag and adapter tie; the format note names the strategy best at it.
    overall = report.recommendation(run)
    assert overall.startswith("adapter and rag tie on this data (F1 0.50)")
    assert "Format: 0% of adapter's answers" not in overall and "100% of adapter's answers" in overall

    text = report.table(report.all_summaries(run))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["subset", "strategy", "n"] and "format" in lines[0].split()
    assert [line.split()[:3] for line in lines[2:]] == [
        ["all", "base", "24"], ["all", "rag", "24"], ["all", "adapter", "24"],
        ["knowledge", "base", "12"], ["knowledge", "rag", "12"], ["knowledge", "adapter", "12"],
        ["style", "base", "12"], ["style", "rag", "12"], ["style", "adapter", "12"]]

    files = report.write_all(run, tmp_path / "out", report.recommendation(run))
    saved = json.loads(files[report.JSON_FILE].read_text())
    assert set(saved["subsets"]) == {"knowledge", "style"}
    assert saved["subsets"]["style"]["ranking"][0] == "adapter"
    assert saved["subsets"]["knowledge"]["recommendation"] == advice["knowledge"]
    assert saved["strategies"][0]["subset"] == "all" and saved["items"][0]["subset"] == "knowledge"
    with files[report.SUMMARY_CSV].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["subset"], r["strategy"]) for r in rows][:4] == [("all", "base"), ("all", "rag"), ("all", "adapter"),
                                                               ("knowledge", "base")]
    assert len(rows) == 9 and rows[-1]["format_rate"] == "1.0" and rows[3]["format_rate"] == ""


def test_bundled_eval_set_is_unseen_and_complete() -> None:
    """The demo's eval set: no question the adapters or the few-shot examples were trained or prompted with
    (exactly, or nearly: same words or the same text with small edits), three subsets a domain."""
    import difflib
    import tomllib

    data = Path(__file__).parent.parent / "lorag" / "demo" / "data"
    seen: dict[str, str] = {}
    for domain in ("legal", "medical"):
        for line in (data / domain / "train.jsonl").read_text(encoding="utf-8").splitlines():
            messages = json.loads(line)["messages"]
            seen[next(m["content"] for m in messages if m["role"] == "user")] = f"{domain} training"
    profiles = tomllib.loads((data / "domains.toml").read_text(encoding="utf-8"))["domains"]
    for domain, profile in profiles.items():
        for example in profile.get("examples", {}).get("items", []):
            seen[example["question"]] = f"{domain} examples"
    items = load_eval_set(data / "eval.jsonl")
    assert len(items) >= 60 and len({item.id for item in items}) == len(items)
    normalized = [metrics.normalize_answer(item.question) for item in items]
    assert len(set(normalized)) == len(items)
    for item, question in zip(items, normalized, strict=True):
        words = set(question.split())
        for other, where in seen.items():
            theirs = metrics.normalize_answer(other)
            overlap = len(words & set(theirs.split())) / len(words | set(theirs.split()))
            similar = difflib.SequenceMatcher(None, question, theirs).ratio()
            assert overlap < 0.6 and similar < 0.8, (item.id, item.question, other, where)
    counts = Counter((item.domain, item.subset) for item in items)
    for domain in ("legal", "medical"):
        for subset in ("knowledge", "style", "mixed"):
            assert counts[(domain, subset)] >= 8, (domain, subset)
    for item in items:
        assert item.domain and item.subset
        if item.subset in ("knowledge", "mixed"):  # facts only a knowledge base holds
            assert item.sources and all((data / item.domain / "knowledge" / s).is_file() for s in item.sources)
        if item.format:  # the reference answers are what a right answer looks like, format included
            assert all(metrics.format_match(answer, item.format) for answer in item.answers), item.id
        if item.subset in ("style", "mixed"):
            assert item.format


# -- the command, before any engine starts --------------------------------------------------------


def _lorag(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorag.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_eval_command_checks_everything_before_starting_the_engine(tmp_path: Path) -> None:
    config = tmp_path / "lorag.toml"
    config.write_text('[model]\npath = "/no/such/model"\n[domains.legal]\n[domains.medical]\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?"}\nnot json\n')
    done = _lorag("eval", str(bad), "--config", str(config), cwd=tmp_path)
    assert done.returncode == 1
    assert "2 problems in the evaluation data" in done.stderr and "line 1: has no 'answer'" in done.stderr
    assert "line 2: not valid JSON" in done.stderr

    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "Q?", "answer": "A"}\n')
    done = _lorag("eval", str(good), "--config", str(config), "--strategies", "base,lora", cwd=tmp_path)
    assert done.returncode == 1 and "unknown strategy 'lora'" in done.stderr
    done = _lorag("eval", str(good), "--config", str(config), cwd=tmp_path)
    assert done.returncode == 1 and "no domain for this question; pass --domain" in done.stderr
    assert "domains: legal, medical" in done.stderr
    done = _lorag("eval", str(good), "--config", str(config), "--domain", "tax", cwd=tmp_path)
    assert done.returncode == 1 and "no domain named 'tax'" in done.stderr
    help_text = _lorag("eval", "--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "--strategies" in help_text.stdout and "--max-tokens" in help_text.stdout


def test_errors_every_item_would_hit_stop_the_run() -> None:
    from lorag.errors import LoragError, NotFoundError
    from lorag.evaluation.runner import _systemic
    from lorag.serving.context import KnowledgeUnavailable
    from lorag.serving.generation import ContextTooLong

    assert _systemic(NotFoundError("no adapter 'memo'", param="lorag.adapter"))
    assert _systemic(KnowledgeUnavailable("store locked"))
    assert _systemic(LoragError("max_tokens is 256, above the domain's limit of 64.", param="max_tokens"))
    assert not _systemic(ContextTooLong("prompt too long", param="max_tokens"))
    assert not _systemic(LoragError("blocked by a plugin"))


def test_eval_progress_off_a_terminal_is_a_line_per_tenth() -> None:
    """A CI log gets a line at every tenth of the run (tqdm's bar is silent there)."""
    import io
    from types import SimpleNamespace

    from lorag.evaluation.cli import _progress

    log = io.StringIO()
    with _progress(37, file=log) as step:
        for i in range(37):
            step(SimpleNamespace(strategy="rag" if i > 20 else "base"))
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("eval: 4/37 answers (10%), now base, ")
    assert lines[-1].startswith("eval: 37/37 answers (100%), now rag, ")
