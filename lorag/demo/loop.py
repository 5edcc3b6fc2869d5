"""`lorag demo loop`: one round of the loop on the demo's legal domain, through the real server.

1. half of the legal eval items (a seeded split) are asked with `store: true`, their reference
   answers in the completions' metadata; the other half is held out and never trained on;
2. POST /v1/training_data builds preference pairs by best-of-n: 4 samples per stored prompt,
   scored by the domain's graders (the fact: token F1 against the reference; the format: the
   whole answer is "Short answer: ...", then "Why: ..."), the best against the worst, each pair starting with the prompt the model was
   given (system prompt and retrieved context: what the adapter serves with);
3. a DPO fine-tuning job continues the domain's adapter on those pairs, with `promote` into the
   domain: the gate compares the new version with the current one on the held-out half;
4. the before/after per subset is printed with its noise bound, and how to roll back.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import click
import httpx

from lorag.demo.setup import DATA
from lorag.evaluation.noise import paired_difference

DOMAIN = "legal"
ADAPTER = "legal-lora"
SEED = 0
JOB_TIMEOUT_S = 3600


def loop_items(eval_file: Path = DATA / "eval.jsonl", seed: int = SEED) -> tuple[list[dict[str, Any]],
                                                                                  list[dict[str, Any]]]:
    """The legal items, split in two halves by subset (seeded): the traffic to learn from, and the held-out."""
    items = [json.loads(line) for line in eval_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    traffic, held = [], []
    by_subset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        if item["domain"] == DOMAIN:
            by_subset[item.get("subset") or "all"].append(item)
    rng = random.Random(seed)
    for subset in sorted(by_subset):
        group = list(by_subset[subset])
        rng.shuffle(group)
        traffic += group[: len(group) // 2]
        held += group[len(group) // 2:]
    return traffic, held


def reference(item: dict[str, Any]) -> str:
    answers = item["answer"]
    return str(answers[0] if isinstance(answers, list) else answers)


def held_out_lines(held: list[dict[str, Any]]) -> str:
    """The held-out items as a supervised file the gate reads (the reference as the answer)."""
    return "".join(json.dumps({
        "messages": [{"role": "user", "content": item["question"]}, {"role": "assistant", "content": reference(item)}],
        "provenance": {"kind": "eval_item", "completions": [], "metadata": {"reference": reference(item),
                                                                            "subset": item.get("subset") or "all"}},
    }) + "\n" for item in held)


def run_round(url: str, echo: Any = click.echo) -> dict[str, Any]:
    """One round against a running demo server; returns the promotion verdict."""
    import openai

    api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    run = f"demo-loop-{int(time.time())}"
    traffic, held = loop_items()
    echo(f"\n1. Storing {len(traffic)} answers of the {DOMAIN} domain (store: true); {len(held)} items held out.")
    for item in traffic:
        api.chat.completions.create(model=DOMAIN, messages=[{"role": "user", "content": item["question"]}],
                                    store=True, metadata={"loop": run, "reference": reference(item),
                                                          "subset": item.get("subset") or "all"})
    echo("2. Best-of-4 samples per stored prompt, graded by the fact and the format, into preference pairs ...")
    with httpx.Client(base_url=url, timeout=3600) as http:
        built = http.post("/v1/training_data", json={
            "kind": "best_of_n", "domain": DOMAIN, "n": 4, "temperature": 1.0, "margin": 0.1, "prompt": "rendered",
            "metadata": {"loop": run}, "filename": f"{run}-pairs"})
    if built.status_code != 200:
        raise click.ClickException(f"building the pairs failed: {built.json()['error']['message']}")
    pairs = built.json()
    echo(f"   {pairs['lines']} pairs from {pairs['considered']} prompts ({pairs['file']['id']}).")
    held_file = api.files.create(file=(f"{run}-held-out.jsonl", held_out_lines(held).encode()), purpose="fine-tune")
    echo(f"3. DPO on {ADAPTER}, gated into the {DOMAIN} domain on the {len(held)} held-out items ...")
    job = api.fine_tuning.jobs.create(
        model=ADAPTER, training_file=pairs["file"]["id"], suffix="loop",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 3}}},
        extra_body={"promote": {"domain": DOMAIN, "eval_file": held_file.id, "max_tokens": 64}})
    done = follow(api, job.id, echo)
    if done.status != "succeeded":
        raise click.ClickException(f"the job {done.status}: {done.error.message if done.error else ''}")
    verdict: dict[str, Any] = done.model_extra["promotion"]
    report(verdict, held, echo)
    return verdict


def follow(api: Any, job_id: str, echo: Any) -> Any:
    """Print the job's events as they come, until it finishes."""
    seen: set[str] = set()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        events = list(api.fine_tuning.jobs.list_events(job_id, limit=100))
        for event in reversed(events):
            if event.id not in seen and event.type == "message":
                seen.add(event.id)
                echo(f"   {event.message}")
        job = api.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(2)
    raise click.ClickException(f"the job {job_id} did not finish within {JOB_TIMEOUT_S} s")


def report(verdict: dict[str, Any], held: list[dict[str, Any]], echo: Any) -> None:
    """Before/after on the held-out items, per subset and overall, with the noise bound."""
    graders = " + ".join(verdict["graders"])
    echo(f"\n4. Held-out items (never trained on), score = mean of {graders}, 0-1:")
    echo(f"   {'subset':<10} {'items':>5} {'before':>8} {'after':>8} {'change':>16}")
    after, before = verdict["scores"]["candidate"], verdict["scores"]["previous"]
    groups: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(held[: len(after)]):
        groups[item.get("subset") or "all"].append(index)
    for name, indexes in [*sorted(groups.items()), ("all", list(range(len(after))))]:
        diff, margin = paired_difference([after[i] - before[i] for i in indexes])
        bound = "n/a" if margin == float("inf") else f"{margin:.3f}"
        echo(f"   {name:<10} {len(indexes):>5} {_mean(before, indexes):>8.3f} {_mean(after, indexes):>8.3f} "
             f"{diff:>+8.3f} ± {bound:<5}")
    state = "promoted" if verdict["promoted"] else "not promoted (registered, inactive)"
    echo(f"\n   {verdict['adapter']}@{verdict['candidate']}: {state}: {verdict['reason']}.")
    if verdict["promoted"] and verdict["previous"]:
        echo(f"   Roll back: lorag adapters activate {verdict['adapter']} {verdict['previous']}")


def _mean(values: list[float], indexes: list[int]) -> float:
    return sum(values[i] for i in indexes) / len(indexes) if indexes else 0.0
