"""Automatic routing and few-shot selection with the real embedding model (no engine needed)."""

from __future__ import annotations

from typing import Any

import pytest

from lorag.config import Settings
from lorag.knowledge.link import KnowledgeLink
from lorag.serving.domains import DomainCatalog
from lorag.serving.principal import Principal
from lorag.serving.routing import Router


def examples(*questions: str) -> dict[str, Any]:
    return {"items": [{"question": q, "answer": "..."} for q in questions]}


DOMAINS: dict[str, Any] = {
    "legal": {"description": "Tenancy and contract law: landlords, tenants, leases, deposits, eviction, notice.",
              "examples": examples("Can my landlord keep my deposit?", "How do I end my lease early?",
                                   "Is a verbal contract binding?")},
    "medical": {"description": "Health and medicine: symptoms, illnesses, drugs, dosage, doctors.",
                "examples": examples("What is a normal body temperature?", "Can I take ibuprofen with food?",
                                     "When should I see a doctor about a cough?")},
    "finance": {"description": "Personal finance: savings, taxes, loans, mortgages, investing, budgets.",
                "examples": examples("How much should I save each month?", "What is a good mortgage rate?",
                                     "How are dividends taxed?")},
    "cooking": {"description": "Cooking and recipes: baking, ingredients, kitchen techniques, meals.",
                "examples": examples("How long do I boil an egg?", "What can replace butter in a cake?",
                                     "How do I make pizza dough?")},
    "general": {},
}

LABELLED = [
    ("My landlord refuses to fix the heating, what are my rights?", "legal"),
    ("How much notice must a tenant give before moving out?", "legal"),
    ("Can I be evicted without a court order?", "legal"),
    ("Who pays for repairs in a rented flat?", "legal"),
    ("Is my signed lease valid if the landlord never signed it?", "legal"),
    ("How do I dispute a deduction from my rental deposit?", "legal"),
    ("What are the symptoms of the flu?", "medical"),
    ("How many paracetamol tablets can an adult take per day?", "medical"),
    ("My child has a fever of 39 degrees, should we go to the doctor?", "medical"),
    ("Is it safe to take antibiotics with alcohol?", "medical"),
    ("What causes high blood pressure?", "medical"),
    ("How do I treat a sprained ankle?", "medical"),
    ("Should I pay off my credit card or invest in an index fund?", "finance"),
    ("How is capital gains tax calculated on shares?", "finance"),
    ("What is the difference between a fixed and variable rate loan?", "finance"),
    ("How big should my emergency savings fund be?", "finance"),
    ("Is it better to rent or buy a house financially?", "finance"),
    ("How do I build a monthly budget?", "finance"),
    ("How long should I bake a loaf of bread?", "cooking"),
    ("What is the best way to cook rice on the stove?", "cooking"),
    ("Can I freeze homemade soup?", "cooking"),
    ("How do I caramelise onions?", "cooking"),
    ("What spices go into a curry?", "cooking"),
    ("How do I keep pasta from sticking together?", "cooking"),
]


@pytest.fixture(scope="module")
def router() -> Router:
    settings = Settings.model_validate({"domains": DOMAINS, "routing": {"threshold": 0.2, "fallback": "general"}})
    return Router(settings, DomainCatalog(settings), KnowledgeLink(settings))


def test_auto_routes_labelled_questions_to_their_domain(router: Router) -> None:
    decisions = [(router.route(question), expected) for question, expected in LABELLED]
    right = sum(decision.domain == expected for decision, expected in decisions)
    wrong = [(q, d.domain, round(d.score, 2)) for (d, _), (q, _) in zip(decisions, LABELLED, strict=True)
             if d.domain != _]
    assert right / len(LABELLED) >= 0.9, wrong
    assert all(decision.confident for decision, _ in decisions if decision.domain != "general")


@pytest.mark.parametrize("question", ["qwzx vlorp snib", "The quick brown fox jumps over the lazy dog.",
                                      "Who won the football match?"])
def test_low_confidence_questions_go_to_the_fallback(router: Router, question: str) -> None:
    decision = router.route(question)
    assert decision.domain == "general" and not decision.confident
    assert max(decision.scores.values()) < 0.2


def test_routing_only_considers_domains_the_key_may_use(router: Router) -> None:
    scoped = Principal(name="legal-team", admin=False, domains=frozenset({"legal", "cooking"}))
    decision = router.route("How many paracetamol tablets can an adult take per day?", scoped)
    assert set(decision.scores) == {"legal", "cooking"}


def test_similar_examples_are_the_ones_closest_to_the_question() -> None:
    items = [
        {"question": "How do I bake sourdough bread?", "answer": "bread"},
        {"question": "What is the notice period for ending a lease?", "answer": "lease"},
        {"question": "How long do I knead bread dough?", "answer": "bread"},
        {"question": "Can a landlord enter my flat without notice?", "answer": "lease"},
        {"question": "What is a good interest rate for savings?", "answer": "money"},
    ]
    settings = Settings.model_validate(
        {"domains": {"d": {"examples": {"items": items, "select": "similar", "k": 2}}}})
    catalog = DomainCatalog(settings)
    chosen = catalog.select_examples(catalog.get("d"), "My landlord wants me out: how much notice must he give?")
    assert [e.answer for e in chosen] == ["lease", "lease"]
    chosen = catalog.select_examples(catalog.get("d"), "Why did my bread not rise in the oven?")
    assert [e.answer for e in chosen] == ["bread", "bread"]
    fixed = DomainCatalog(Settings.model_validate({"domains": {"d": {"examples": {"items": items, "k": 2}}}}))
    assert [e.question for e in fixed.select_examples(fixed.get("d"), "anything")] == [
        items[0]["question"], items[1]["question"]]
    assert catalog.select_examples(catalog.get("d"), "anything", k=0) == []


def test_domain_settings_refuse_what_cannot_work() -> None:
    from pydantic import ValidationError

    for bad in ({"domains": {"auto": {}}}, {"routing": {"fallback": "nowhere"}},
                {"domains": {"d": {"knowledge": {"top_k": 0}}}}, {"domains": {"d": {"adapter": "a@b@c"}}},
                {"domains": {"d": {"plugins": {"enabled": ["pii"]}}}, "plugins": {"domains": {"d": {"enabled": []}}}}):
        with pytest.raises(ValidationError):
            Settings.model_validate(bad)


def test_route_and_domains_commands(tmp_path: Any) -> None:
    import json

    from click.testing import CliRunner

    from lorag.cli import cli

    config = tmp_path / "lorag.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n'
                      '[domains.legal]\ndescription = "Tenancy law: landlords, leases, deposits."\nadapter = "legal@v2"\n'
                      '[domains.cooking]\ndescription = "Cooking: recipes, baking, ingredients."\n'
                      '[routing]\nfallback = "cooking"\n')
    runner = CliRunner()
    result = runner.invoke(cli, ["route", "Can my landlord keep the deposit?", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    decision = json.loads(result.output[result.output.index("{"):])
    assert decision["domain"] == "legal" and decision["confident"]
    listed = runner.invoke(cli, ["domains", "list", "-c", str(config), "--json"])
    rows = json.loads(listed.output[listed.output.index("{"):])["domains"]
    assert [(r["name"], r["adapter"]) for r in rows] == [("legal", "legal@v2"), ("cooking", None)]
    missing = runner.invoke(cli, ["domains", "show", "nope", "-c", str(config)])
    assert missing.exit_code != 0

