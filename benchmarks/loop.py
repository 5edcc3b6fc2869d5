"""Distillation on the demo's real model: knowledge moved from retrieved context into the adapter.

    .venv/bin/python benchmarks/loop.py [--state-dir .lorag] [--port 18432] [--epochs 3]

Sets up the demo (SmolLM2-135M-Instruct, `lorag demo`'s set-up, reused), serves it in this process,
then, through the real server and the official client:
1. the legal eval items are split as `lorag demo loop` splits them (seeded, half per subset): the
   traffic half is asked with `store: true`;
2. POST /v1/training_data kind "distillation": the teacher is the legal domain itself, retrieval on;
   its answers to the stored conversations become supervised lines for the student;
3. a supervised job continues legal-lora on them (no promotion: the student is measured here);
4. the student (the legal domain with `no_retrieval`: the adapter alone, a shorter prompt) answers
   every item before (legal-lora) and after (the job's ft: model), greedily, one request at a time;
   the teacher answers them too. Token F1 against the references (SQuAD's), the paired difference
   after - before with its noise bound (1.96 standard errors), latency p50 and prompt tokens, on the
   held-out half (never trained on) and, for reference, on the traffic half (trained on).
The machine is shared and noisy: latencies are medians of one pass; read them side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorag.demo.loop import DOMAIN, loop_items, reference  # noqa: E402
from lorag.evaluation.metrics import token_f1  # noqa: E402
from lorag.evaluation.noise import paired_difference  # noqa: E402

ADAPTER = "legal-lora"


def answers(api: Any, items: list[dict[str, Any]], options: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(answer, latency ms, prompt tokens) per item, one request at a time, greedy."""
    out = []
    for item in items:
        started = time.perf_counter()
        reply = api.chat.completions.create(model=DOMAIN, messages=[{"role": "user", "content": item["question"]}],
                                            temperature=0, max_tokens=64, extra_body={"lorag": options} if options else {})
        out.append((reply.choices[0].message.content or "", (time.perf_counter() - started) * 1000,
                    reply.usage.prompt_tokens))
    return out


def f1s(items: list[dict[str, Any]], found: list[tuple[str, float, int]]) -> list[float]:
    refs = [item["answer"] if isinstance(item["answer"], list) else [item["answer"]] for item in items]
    return [token_f1(answer, ref) for (answer, _, _), ref in zip(found, refs, strict=True)]


def measure(url: str, epochs: int) -> None:
    import openai

    api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    traffic, held = loop_items()
    run = f"bench-distil-{int(time.time())}"
    for item in traffic:
        api.chat.completions.create(model=DOMAIN, messages=[{"role": "user", "content": item["question"]}],
                                    store=True, metadata={"bench": run, "reference": reference(item)})
    with httpx.Client(base_url=url, timeout=3600) as http:
        made = http.post("/v1/training_data", json={"kind": "distillation", "metadata": {"bench": run},
                                                    "teacher": {"model": DOMAIN, "max_tokens": 64}}).json()
    print(f"distillation file {made['file']['id']}: {made['lines']} lines from {made['considered']} stored prompts")
    job = api.fine_tuning.jobs.create(model=ADAPTER, training_file=made["file"]["id"], suffix="student",
                                      method={"type": "supervised", "supervised": {"hyperparameters": {
                                          "n_epochs": epochs}}})
    while (done := api.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(5)
    if done.status != "succeeded":
        raise SystemExit(f"the job {done.status}: {done.error}")
    student_after = done.fine_tuned_model
    print(f"student trained: {student_after} ({done.trained_tokens} tokens)\n")
    systems = {"teacher (adapter + retrieval)": {}, "student before (legal-lora alone)": {"no_retrieval": True},
               "student after (distilled, alone)": {"no_retrieval": True, "adapter": student_after}}
    for name, items in (("held-out half (never trained on)", held), ("traffic half (trained on)", traffic)):
        print(f"{name}: {len(items)} items")
        print(f"  {'system':<34} {'F1':>6} {'vs student before':>20} {'p50 ms':>8} {'prompt tok':>10}")
        results = {system: answers(api, items, options) for system, options in systems.items()}
        baseline = f1s(items, results["student before (legal-lora alone)"])
        for system, found in results.items():
            scores = f1s(items, found)
            diff, margin = paired_difference([a - b for a, b in zip(scores, baseline, strict=True)])
            print(f"  {system:<34} {statistics.mean(scores):>6.3f} {diff:>+10.3f} ± {margin:<7.3f} "
                  f"{statistics.median(f[1] for f in found):>8.0f} {statistics.mean(f[2] for f in found):>10.0f}")
        print()
    print(json.dumps({"job": job.id, "student": student_after, "lines": made["lines"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=str(ROOT / ".lorag"))
    parser.add_argument("--port", type=int, default=18432)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    from lorag.demo.command import serve_while, set_up
    from lorag.demo.setup import REAL

    config = set_up(args.state_dir, args.port, REAL)
    serve_while(config, args.port, lambda url: measure(url, args.epochs), exit_after=True, engine_wait="30-90 s")


if __name__ == "__main__":
    main()
