"""Graders (OpenAI's grader schema): string_check, text_similarity on lorag's own metrics, and
score_model against a real OpenAI-compatible endpoint (lorag's app on the echo engine); their
configuration in lorag.toml; and their columns in `lorag eval`'s results."""

from __future__ import annotations

import csv
import difflib
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from pydantic import TypeAdapter, ValidationError

from lorag.config import Settings
from lorag.evaluation import metrics, report
from lorag.evaluation.dataset import EvalItem
from lorag.evaluation.graders import (
    METRICS,
    GraderError,
    ScoreModelGrader,
    build_grader,
    domain_graders,
    grade_all,
    parse_score,
    render,
)
from lorag.evaluation.results import EvalRun, ItemResult, grade, score, summarise
from lorag.evaluation.runner import EvalError, Evaluator, parse_strategies, pick_graders, plan_runs
from lorag.loop.grader_settings import SUPPORTED_METRICS, GraderSpec, ScoreModelSpec
from tests.echo_server import USER_KEY, EchoServer, echo_server, echo_settings

SPEC: TypeAdapter[Any] = TypeAdapter(GraderSpec)
ITEM = {"question": "How long is the notice?", "reference": "Thirty days", "answers": ["Thirty days", "30 days"]}


def spec(**fields: Any) -> Any:
    return SPEC.validate_python({"name": "g", "input": "{{sample.output_text}}", **fields})


def check(operation: str, reference: str = "{{item.reference}}") -> Any:
    return build_grader(spec(type="string_check", reference=reference, operation=operation))


# -- string_check -----------------------------------------------------------------------------


def test_string_check_operations() -> None:
    assert check("eq").grade("Thirty days", ITEM) == 1.0
    assert check("eq").grade("thirty days", ITEM) == 0.0
    assert check("ne").grade("thirty days", ITEM) == 1.0
    assert check("like").grade("About Thirty days, in writing.", ITEM) == 1.0
    assert check("like").grade("about thirty days", ITEM) == 0.0
    assert check("ilike").grade("ABOUT THIRTY DAYS", ITEM) == 1.0
    assert check("ilike").grade("a month", ITEM) == 0.0
    assert check("eq", reference="Q: {{ item.question }}").grade("Q: How long is the notice?", ITEM) == 1.0
    assert check("eq").pass_threshold == 1.0
    two_lines = r"Short answer: [^\n]+\nWhy: [^\n]+"  # lorag's `matches`: eval's format rule (fullmatch)
    assert check("matches", two_lines).grade("Short answer: No.\nWhy: It is unlawful.\n", ITEM) == 1.0
    assert check("matches", two_lines).grade("Short answer: No.\nWhy: It is unlawful.\nAlso this.", ITEM) == 0.0
    with pytest.raises(ValidationError, match="not a regular expression"):
        check("matches", "Short answer: [")


def test_templates_render_the_sample_and_item_fields_and_name_what_is_missing() -> None:
    assert render("{{sample.output_text}} / {{item.question}}", "yes", ITEM) == "yes / How long is the notice?"
    assert render("{{item.answers}}", "", ITEM) == '["Thirty days", "30 days"]'  # not a string: JSON
    with pytest.raises(GraderError, match=r"\{\{item.answer\}\}: the item has no field 'answer' "
                                          r"\(it has: answers, question, reference\)"):
        check("eq", reference="{{item.answer}}").grade("x", ITEM)
    for bad, why in (("{{sample.text}}", "the sample has only output_text"),
                     ("{{ reference }}", "a placeholder is"), ("{{item.}}", "a placeholder is")):
        with pytest.raises(ValidationError, match=why):
            spec(type="string_check", reference=bad, operation="eq")


# -- text_similarity --------------------------------------------------------------------------


@pytest.mark.parametrize("metric", SUPPORTED_METRICS)
def test_text_similarity_values_are_lorag_evals_metrics(metric: str) -> None:
    answer, refs = "the notice is thirty days in writing", ["Thirty days, in writing."]
    got = build_grader(spec(type="text_similarity", reference="{{item.reference}}",
                            evaluation_metric=metric)).grade(answer, {"reference": refs[0]})
    own = {"bleu": lambda: metrics.sentence_bleu(answer, refs) / 100,
           "rouge_l": lambda: metrics.rouge_l(answer, refs),
           "token_f1": lambda: metrics.token_f1(answer, refs),
           "exact_match": lambda: metrics.exact_match(answer, refs),
           "fuzzy_match": lambda: difflib.SequenceMatcher(None, answer, refs[0]).ratio()}
    expected = own[metric]() if metric in own else metrics.rouge(answer, refs, "rouge" + metric.removeprefix("rouge_"))
    assert got == pytest.approx(expected) and 0.0 <= got <= 1.0
    assert set(METRICS) == set(SUPPORTED_METRICS)


def test_text_similarity_specifics() -> None:
    rouge_1 = metrics.rouge("thirty days", ["days thirty"], "rouge1")
    assert rouge_1 == 1.0 and metrics.rouge("thirty days", ["days thirty"], "rouge2") == 0.0
    assert metrics.rouge_l("thirty days", ["thirty days"]) == 1.0
    # A reference naming a list of answers takes the best of them, like lorag eval's metrics.
    f1 = build_grader(spec(type="text_similarity", reference="{{item.answers}}", evaluation_metric="token_f1",
                           pass_threshold=0.5))
    assert f1.grade("30 days", ITEM) == 1.0 and f1.pass_threshold == 0.5
    assert build_grader(spec(type="text_similarity", reference="{{item.answers}}",
                             evaluation_metric="exact_match")).grade("thirty days", ITEM) == 1.0


# -- configuration --------------------------------------------------------------------------


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="does not match any of the expected tags: 'string_check', "
                                              "'text_similarity', 'score_model'"):
        spec(type="label_model", reference="x")
    for metric, kind in (("meteor", "an OpenAI metric lorag does not compute"), ("cosine_sim", "unknown")):
        with pytest.raises(ValidationError, match=f"evaluation_metric '{metric}' is {kind}; supported: "
                                                  "fuzzy_match, bleu, rouge_1"):
            spec(type="text_similarity", reference="x", evaluation_metric=metric)
    with pytest.raises(ValidationError, match="operation"):
        spec(type="string_check", reference="x", operation="contains")
    with pytest.raises(ValidationError, match="pass_threshold 12.0 is outside the range"):
        spec(type="score_model", model="m", input=[{"role": "user", "content": "x"}], range=[1, 10],
             pass_threshold=12)
    with pytest.raises(ValidationError, match="the minimum must be below the maximum"):
        spec(type="score_model", model="m", input=[{"role": "user", "content": "x"}], range=[1, 1])
    string_check = {"type": "string_check", "name": "same", "input": "{{sample.output_text}}", "reference": "x",
                    "operation": "eq"}
    with pytest.raises(ValidationError, match="grader names must be unique within a domain: same repeated"):
        echo_settings(tmp_path, domains={"legal": {"graders": [string_check, string_check]}})
    settings = echo_settings(tmp_path, domains={"legal": {"graders": [string_check]}, "tax": {}})
    assert [g.name for g in domain_graders(settings, "legal")] == ["same"] and domain_graders(settings, "tax") == []
    with pytest.raises(GraderError, match="no domain named 'med'"):
        domain_graders(settings, "med")


def test_a_toml_domain_names_its_graders(tmp_path: Path) -> None:
    from lorag.config import load_settings

    config = tmp_path / "lorag.toml"
    config.write_text('[model]\npath = "m"\n[domains.legal]\n\n[[domains.legal.graders]]\ntype = "string_check"\n'
                      'name = "says_yes"\ninput = "{{sample.output_text}}"\nreference = "{{item.reference}}"\n'
                      'operation = "ilike"\n\n[[domains.legal.graders]]\ntype = "score_model"\nname = "judge"\n'
                      'model = "gpt-4o-mini"\nrange = [1, 10]\napi_key_env = "NO_SUCH_KEY_VAR"\n'
                      'input = [{role = "user", content = "Rate {{sample.output_text}}"}]\n'
                      'sampling_params = {temperature = 0, max_completions_tokens = 8}\n')
    settings = load_settings(config)
    graders = settings.domains["legal"].graders
    assert [g.type for g in graders] == ["string_check", "score_model"]
    assert grade_all(domain_graders(settings, "legal", only={"says_yes"}), "YES", {"reference": "yes"}) == \
        {"says_yes": 1.0}
    with pytest.raises(GraderError, match="grader 'judge': the environment variable NO_SUCH_KEY_VAR"):
        domain_graders(settings, "legal")


# -- score_model, against lorag's own server on the echo engine -----------------------------------


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    with echo_server(echo_settings(tmp_path_factory.mktemp("judge"))) as server:
        yield server


def judge(server: EchoServer, **fields: Any) -> ScoreModelGrader:
    body = {"type": "score_model", "name": "judge", "model": "echo-base", "base_url": server.api,
            "api_key_env": "JUDGE_KEY",
            "input": [{"role": "system", "content": "Grade the answer from 1 to 10."},
                      {"role": "user", "content": "Q: {{item.question}}\nRef: {{item.reference}}\n"
                                                  "A: {{sample.output_text}}"}],
            **fields}
    grader = build_grader(ScoreModelSpec.model_validate(body))
    assert isinstance(grader, ScoreModelGrader)
    return grader


def test_score_model_asks_the_judge_and_normalises_by_the_range(judge_server: EchoServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", USER_KEY)
    grader = judge(judge_server, range=[1, 10], pass_threshold=7,
                   sampling_params={"temperature": 0, "max_completions_tokens": 5, "seed": 3})
    assert grader.pass_threshold == pytest.approx(6 / 9)
    judge_server.engine.reply("8.2 -- good")
    before = len(judge_server.engine.calls)
    verdict = grader.judge("Thirty days.", ITEM)
    assert verdict is not None and verdict.raw == 8.2 and verdict.normalised == pytest.approx(7.2 / 9)
    call = judge_server.engine.calls[before]
    assert call.prompt == ("<|system|>Grade the answer from 1 to 10.<|end|><|user|>Q: How long is the notice?\n"
                           "Ref: Thirty days\nA: Thirty days.<|end|><|assistant|>")
    assert call.params.max_tokens == 5 and call.params.temperature == 0 and call.params.seed == 3
    judge_server.engine.reply('{"score": 10}', '```json\n{"result": 1}\n```')
    unlimited = judge(judge_server, range=[1, 10])  # (5 tokens would cut the JSON short)
    assert unlimited.grade("x", ITEM) == 1.0 and unlimited.grade("x", ITEM) == 0.0


def test_a_judge_without_a_score_gives_none_and_logs_why(judge_server: EchoServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", USER_KEY)
    grader = judge(judge_server)  # range [0, 1]
    judge_server.engine.reply("I cannot say.", "7", "")
    with structlog.testing.capture_logs() as events:
        assert grader.grade("x", ITEM) is None  # no number
        assert grader.grade("x", ITEM) is None  # outside the range: not clamped
        assert grader.grade("x", ITEM) is None  # empty reply
    bad = [e for e in events if e["event"] == "grader.bad_score"]
    assert [e["error"] for e in bad] == ["no number in the reply", "the score is outside the range",
                                         "no number in the reply"]
    assert bad[1]["score"] == 7.0 and bad[1]["range"] == [0.0, 1.0] and bad[0]["log_level"] == "error"
    # No api_key_env: no Authorization header, so lorag's server refuses; still None, never an exception.
    keyless = build_grader(ScoreModelSpec.model_validate({**grader.spec.model_dump(), "api_key_env": None}))
    with structlog.testing.capture_logs() as events:
        assert keyless.grade("x", ITEM) is None
    failed = next(e for e in events if e["event"] == "grader.judge_failed")
    assert failed["error"].startswith("AuthenticationError") and failed["grader"] == "judge"


def test_parse_score() -> None:
    assert parse_score("Score: 7/10") == 7.0 and parse_score("-0.5") == -0.5 and parse_score(".25 overall") == 0.25
    assert parse_score('{"score": 0.9, "why": "3 reasons"}') == 0.9 and parse_score('{"result": 2}') == 2.0
    assert parse_score('{"why": "3 reasons"}') == 3.0 and parse_score("none") is None
    assert parse_score('{"score": true}') is None


# -- in lorag eval ----------------------------------------------------------------------------------


def eval_settings(tmp_path: Path) -> Settings:
    yes = {"type": "string_check", "name": "mentions", "input": "{{sample.output_text}}",
           "reference": "{{item.reference}}", "operation": "ilike"}
    f1 = {"type": "text_similarity", "name": "f1_any", "input": "{{sample.output_text}}",
          "reference": "{{item.answers}}", "evaluation_metric": "token_f1"}
    return echo_settings(tmp_path, domains={"legal": {"graders": [yes, f1]}, "tax": {"graders": [yes]}})


class FakePipeline:
    """Answers every question with `answer: <question>` (prepare_chat/complete, as the runner calls them)."""

    base_model = "m"

    async def prepare_chat(self, request: Any, request_id: str) -> Any:
        return SimpleNamespace(question=request.messages[-1].content, completion_tokens=3, prompt_tokens=9,
                               citations=[], timings={})

    async def complete(self, job: Any) -> list[Any]:
        return [SimpleNamespace(text=f"answer: {job.question}")]


def test_eval_grades_each_answer_and_reports_each_graders_mean(tmp_path: Path) -> None:
    import asyncio

    settings = eval_settings(tmp_path)
    items = [EvalItem(line=1, question="thirty days?", answers=("Thirty days", "one month"), domain="legal"),
             EvalItem(line=2, question="forty?", answers=("ten",), domain="legal"),
             EvalItem(line=3, question="tax", answers=("tax",), domain="tax")]
    domains = {1: "legal", 2: "legal", 3: "tax"}
    plan = plan_runs(items, parse_strategies("base"), domains, settings)
    loop = asyncio.new_event_loop()
    try:
        evaluator = Evaluator(FakePipeline(), loop.run_until_complete, None,  # type: ignore[arg-type]
                              graders=pick_graders(settings, items, domains))
        run = evaluator.evaluate(plan, domains)
    finally:
        loop.close()
    grades = [r.grades for r in run.items]
    assert grades == [{"mentions": 1.0, "f1_any": pytest.approx(0.8)}, {"mentions": 0.0, "f1_any": 0.0},
                      {"mentions": 1.0}]
    assert run.summaries[0].grades == {"mentions": pytest.approx(2 / 3), "f1_any": pytest.approx(0.4)}

    header, _, row = report.table(run.summaries).splitlines()
    assert header.split()[-3:] == ["mentions", "f1_any", "errors"] and row.split()[-3:] == ["0.667", "0.400", "0"]
    files = report.write_all(run, tmp_path / "out", report.recommendation(run))
    saved = json.loads(files[report.JSON_FILE].read_text())
    assert saved["strategies"][0]["grades"] == {"mentions": pytest.approx(2 / 3), "f1_any": pytest.approx(0.4)}
    assert saved["items"][2]["grades"] == {"mentions": 1.0}
    with files[report.ITEMS_CSV].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["grade.mentions"], r["grade.f1_any"]) for r in rows] == [("1.0", "0.8"), ("0.0", "0.0"), ("1.0", "")]
    with files[report.SUMMARY_CSV].open() as handle:
        assert next(csv.DictReader(handle))["grade.f1_any"] == "0.4"


def test_eval_picks_graders_by_name_and_a_failed_answer_scores_zero(tmp_path: Path) -> None:
    settings = eval_settings(tmp_path)
    item = EvalItem(line=1, question="q", answers=("yes",), subset="s")
    legal, both = {1: "legal"}, {1: "legal", 2: "tax"}
    two = [item, EvalItem(line=2, question="q", answers=("yes",))]
    assert [g.name for g in pick_graders(settings, [item], legal, ["f1_any"])["legal"]] == ["f1_any"]
    assert pick_graders(settings, two, both, ["f1_any"])["tax"] == []
    with pytest.raises(EvalError, match=r"no grader named 'judge' in the domains evaluated \(graders: f1_any, "
                                        r"mentions\)"):
        pick_graders(settings, [item], legal, ["mentions", "judge"])
    # An item without a field a grader reads is refused before anything runs (unless that grader is not picked).
    subset = {"type": "string_check", "name": "in_subset", "input": "{{item.subset}}", "reference": "s",
              "operation": "eq"}
    strict = echo_settings(tmp_path, domains={"legal": {"graders": [subset]}, "tax": {"graders": [subset]}})
    assert pick_graders(strict, [item], legal)["legal"][0].grade("", item.fields()) == 1.0
    with pytest.raises(EvalError, match=r"line 2: grader 'in_subset' of domain 'tax' reads \{\{item.subset\}\}, "
                                        "which this item does not have"):
        pick_graders(strict, two, both)

    graders = pick_graders(settings, [item], legal)["legal"]
    failed = grade(score(ItemResult("base", "line 1", 1, "legal", "q", ["yes"], error="too long"), item, False),
                   item, graders)
    answered = grade(score(ItemResult("base", "line 1", 1, "legal", "q", ["yes"], prediction="Yes.", subset="s"),
                           item, False), item, graders)
    assert failed.grades == {"mentions": 0.0, "f1_any": 0.0} and answered.grades == {"mentions": 1.0, "f1_any": 1.0}
    run = EvalRun(meta={}, items=[answered], summaries=[summarise("base", [answered])])
    assert run.for_subset("s").summaries[0].grades == {"mentions": 1.0, "f1_any": 1.0}
    assert summarise("base", [failed, answered]).grades == {"mentions": 0.5, "f1_any": 0.5}


def test_eval_command_has_a_grader_option() -> None:
    from click.testing import CliRunner

    from lorag.evaluation.cli import eval_command

    done = CliRunner().invoke(eval_command, ["--help"])
    assert done.exit_code == 0 and "--grader NAME" in done.output
