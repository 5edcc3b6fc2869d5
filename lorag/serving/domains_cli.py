"""`lorag domains list|show` and `lorag route "question"`: the profiles in lorag.toml, and where auto sends a question.

Both read the configuration in this process; `route` embeds the question with the
same model and profiles the server uses, so its decision is the server's decision
(the knowledge part of a profile is left out when another process owns the store).
"""

from __future__ import annotations

import json

import click

from lorag.cli_options import cli_settings, config_options


@click.group("domains")
@config_options
def domains_group() -> None:
    """Domain profiles: adapter, knowledge bases, plugins, prompt and examples per domain."""


@domains_group.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_domains(as_json: bool) -> None:
    """Every domain with its adapter, knowledge bases and examples."""
    from lorag.serving.domains import DomainCatalog

    catalog = DomainCatalog(cli_settings())
    rows = [{"name": d.name, **d.summary()} for d in catalog]
    if as_json:
        click.echo(json.dumps({"domains": rows}, indent=2))
        return
    if not rows:
        click.echo("No domains configured: add [domains.<name>] tables to lorag.toml.")
        return
    click.echo(f"{'DOMAIN':<16} {'ADAPTER':<18} {'KNOWLEDGE':<28} {'EXAMPLES':>8}  DESCRIPTION")
    for row in rows:
        kbs = ",".join(row["knowledge_bases"]) or "-"
        click.echo(f"{row['name']:<16} {row['adapter'] or '(base)':<18} {kbs:<28} {row['examples']:>8}  "
                   f"{row['description'][:60]}")


@domains_group.command("show")
@click.argument("name")
@config_options
def show_domain(name: str) -> None:
    """The whole profile of one domain, as JSON."""
    from lorag.serving.domains import DomainCatalog

    domain = DomainCatalog(cli_settings()).get(name)
    profile = domain.settings.model_dump(mode="json")
    profile["examples"]["items"] = [e.model_dump() for e in domain.examples]
    click.echo(json.dumps({"name": name, **profile}, indent=2))


@click.command("route")
@click.argument("question")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def route(question: str, as_json: bool) -> None:
    """Show which domain `model: "auto"` picks for QUESTION, and every domain's score."""
    from lorag.knowledge.link import KnowledgeLink
    from lorag.serving.domains import DomainCatalog
    from lorag.serving.routing import Router

    settings = cli_settings()
    if not settings.domains:
        raise click.ClickException("no domains configured: add [domains.<name>] tables to lorag.toml")
    knowledge = KnowledgeLink(settings)
    try:
        decision = Router(settings, DomainCatalog(settings), knowledge).route(question)
    finally:
        knowledge.close()
    if as_json:
        click.echo(json.dumps(decision.to_dict(), indent=2))
        return
    verdict = "confident" if decision.confident else f"below {settings.routing.threshold}: fallback"
    click.echo(f"-> {decision.domain} (score {decision.score:.3f}, {verdict})")
    for name, score in sorted(decision.scores.items(), key=lambda kv: -kv[1]):
        click.echo(f"   {name:<16} {score:.3f}")
