"""RAG overhead benchmark: a domain request with retrieval (top-4) vs the same final prompt sent straight to the engine.

    .venv/bin/python benchmarks/rag_overhead.py --model /tmp/smollm2-hf --tokens 32 --rounds 2 \\
        --workdir /tmp/lorag-rag-bench

(without --model: a tiny random model built in the workdir.)

One `lorag serve` in this one run serves a domain `bench`: a random rank-8 adapter,
a system prompt and a knowledge base `bench-kb` built with lorag's own KnowledgeService
(lorag/demo/data/*/knowledge and docs/*.md: a few hundred chunks), top_k = 4, plugins
off, no few-shot examples. For each question the two sides are:
 - rag:    POST /v1/chat/completions {model: "bench", messages: [question]}: resolve,
           retrieve (hybrid vector + BM25), prompt fitting and the chat template, generate;
 - direct: POST /v1/completions {model: <the domain's adapter>, prompt: <token ids>} with
           the final prompt's token ids: the same adapter, the same tokens, the same output.
The direct prompt is built before timing with lorag's own functions (the hits from the
server's /v1/knowledge/bench-kb/query with the same top_k, lorag.serving.prompt.build_messages
and the model's chat template, as the server renders it); the run checks, per question,
that the rag side's prompt_tokens equals its length and that both sides' greedy answers
are identical, so the engine does the same work on both sides and the difference is what
retrieval and prompt building add. Both go through the same server and engine (same
HTTP, JSON and detokenization costs): the comparison prices RAG, not lorag vs vLLM
(benchmarks/serving.py does that). The engine's prefix cache is off (each request pays
its full prefill, as distinct questions would; otherwise the second side of a pair would
find the first one's prompt cached).

Requests are sequential, greedy, non-streamed, max_tokens fixed with ignore_eos; the
order of the two sides alternates per question and round. Prints per-round medians of
end-to-end latency, the median over rounds, the added latency in % and lorag's own
stage timings (retrieve_ms, prompt_ms, prepare_ms from the response's `lorag` field).
Target: added latency <= 10%.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorag.demo.devmodel import build_tiny_model  # noqa: E402
from tests.devserver import stop_process, wait_until_up  # noqa: E402
from tests.random_adapter import build_random_adapter  # noqa: E402

KB = "bench-kb"
DOMAIN = "bench"
ADAPTER = "bench-lora"
TOP_K = 4
SYSTEM_PROMPT = "You are a careful assistant. Answer from the context in two or three sentences."
SOURCES = [ROOT / "lorag" / "demo" / "data" / "legal" / "knowledge", ROOT / "lorag" / "demo" / "data" / "medical" / "knowledge",
           ROOT / "docs"]
QUESTIONS = [
    "How long does a landlord have to return a tenancy deposit?",
    "How much notice must a tenant give to end a periodic tenancy?",
    "Who must pay for repairs to the boiler in a rented flat?",
    "What dose of paracetamol can an adult take in one day?",
    "When should a child with a fever see a doctor?",
    "What are the clinic's opening hours?",
    "How do I train a LoRA adapter for a domain?",
    "How does hybrid retrieval combine keyword and vector search?",
    "Which plugins can redact personal data from answers?",
    "How is a domain's system prompt configured?",
    "How do I ingest documents into a knowledge base?",
    "What does the evaluation compare?",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(workdir: Path, model: Path, adapter: Path, port: int, max_model_len: int) -> Path:
    config = workdir / "lorag.toml"
    config.write_text(f"""
state_dir = "{workdir / 'state'}"
[model]
path = "{model}"
name = "base"
dtype = "float32"
max_model_len = {max_model_len}
[engine]
max_loras = 1
max_lora_rank = 8
enforce_eager = true
kv_cache_memory_bytes = {512 << 20}
[engine.extra]
enable_prefix_caching = false
[server]
port = {port}
[plugins]
default = []
[adapters.preload.{ADAPTER}]
path = "{adapter}"
[domains.{DOMAIN}]
adapter = "{ADAPTER}"
system_prompt = "{SYSTEM_PROMPT}"
[domains.{DOMAIN}.knowledge]
bases = ["{KB}"]
top_k = {TOP_K}
[domains.{DOMAIN}.generation]
temperature = 0.0
""")
    return config


def build_knowledge(config: Path) -> str:
    """The knowledge base, ingested with lorag's own service before the server (the store's one owner) starts."""
    from lorag.config import load_settings
    from lorag.knowledge.service import KnowledgeService

    service = KnowledgeService.from_settings(load_settings(config))
    try:
        if not service.exists(KB):
            service.create(KB, description="benchmark: demo knowledge and lorag's docs")
            service.ingest_paths(KB, [str(p) for p in SOURCES])
        summary = service.summary(KB)
    finally:
        service.close()
    return ", ".join(f"{k} {v}" for k, v in summary.items() if isinstance(v, int))


def final_prompt(client: httpx.Client, tokenizer: Any, question: str) -> tuple[list[int], list[str]]:
    """The token ids the server renders for the domain request, built with lorag's own prompt functions."""
    from lorag.knowledge.retrieval import Hit
    from lorag.serving.prompt import build_messages

    response = client.post(f"/v1/knowledge/{KB}/query", json={"query": question, "top_k": TOP_K})
    response.raise_for_status()
    hits = [Hit(kb=h["kb"], source=h["source"], location=h["location"], text=h["text"], score=h["score"],
                metadata=h["metadata"]) for h in response.json()["hits"]]
    messages = build_messages(SYSTEM_PROMPT, hits, [], [{"role": "user", "content": question}])
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False)), [h.source for h in hits]


def rag_request(client: httpx.Client, question: str, tokens: int) -> tuple[float, dict[str, Any]]:
    body = {"model": DOMAIN, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text[:500]}")
    return elapsed, response.json()


def direct_request(client: httpx.Client, prompt: list[int], tokens: int) -> tuple[float, dict[str, Any]]:
    body = {"model": ADAPTER, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    response = client.post("/v1/completions", json=body)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text[:500]}")
    return elapsed, response.json()


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="an HF model folder (default: a tiny random model built in the workdir)")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of every request (ignore_eos)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--questions", type=int, default=len(QUESTIONS))
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the model, adapter and knowledge base")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorag-rag-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model.resolve() if args.model else build_tiny_model(workdir / "tiny")
    adapter = build_random_adapter(model, workdir / f"{model.name}-{ADAPTER}", seed=7, rank=8)
    port = free_port()
    config = write_config(workdir, model, adapter, port, args.max_model_len)
    kb = build_knowledge(config)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    questions = QUESTIONS[: args.questions]
    url = f"http://127.0.0.1:{port}"
    log = workdir / f"lorag-{port}.log"
    process = subprocess.Popen([sys.executable, "-m", "lorag.cli", "serve", "--config", str(config)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, "LORAG_LOG_LEVEL": "warning", "VLLM_LOGGING_LEVEL": "WARNING"})
    try:
        wait_until_up(process, url, log)
        with httpx.Client(base_url=url, timeout=300) as client:
            prompts = {q: final_prompt(client, tokenizer, q) for q in questions}
            mismatches = []
            for q in questions:  # warm-up, and the apples-to-apples check
                _, rag = rag_request(client, q, args.tokens)
                _, direct = direct_request(client, prompts[q][0], args.tokens)
                sources = [c["source"] for c in rag["lorag"]["citations"]]
                same = (rag["usage"]["prompt_tokens"] == len(prompts[q][0]) == direct["usage"]["prompt_tokens"]
                        and rag["choices"][0]["message"]["content"] == direct["choices"][0]["text"]
                        and sources == prompts[q][1] and "trimmed" not in rag["lorag"])
                if not same:
                    mismatches.append(q)
            lengths = [len(prompts[q][0]) for q in questions]
            print(f"model {model}; kb {KB}: {kb}; {len(questions)} questions, prompts {min(lengths)}-{max(lengths)} "
                  f"tokens (median {statistics.median(lengths):.0f}), {args.tokens} output tokens, top_k {TOP_K}, "
                  f"rounds {args.rounds}; load average {loadavg()}", flush=True)
            print(f"same prompt and same answer on both sides: {len(questions) - len(mismatches)}/{len(questions)}"
                  + (f" (differ: {mismatches})" if mismatches else ""), flush=True)
            per_round: list[tuple[float, float]] = []
            stage_ms: dict[str, list[float]] = {"retrieve_ms": [], "prompt_ms": [], "prepare_ms": []}
            for round_index in range(args.rounds):
                rag_s: list[float] = []
                direct_s: list[float] = []
                for i, q in enumerate(questions):
                    order = ("rag", "direct") if (i + round_index) % 2 == 0 else ("direct", "rag")
                    for side in order:
                        if side == "rag":
                            elapsed, body = rag_request(client, q, args.tokens)
                            rag_s.append(elapsed)
                            for key, values in stage_ms.items():
                                values.append(float(body["lorag"]["timings"].get(key, 0.0)))
                        else:
                            elapsed, _ = direct_request(client, prompts[q][0], args.tokens)
                            direct_s.append(elapsed)
                rag_median, direct_median = statistics.median(rag_s) * 1000, statistics.median(direct_s) * 1000
                per_round.append((rag_median, direct_median))
                print(f"round {round_index + 1}: rag {rag_median:8.1f} ms, direct {direct_median:8.1f} ms, "
                      f"added {100 * (rag_median / direct_median - 1):+6.1f}%; load average {loadavg()}", flush=True)
    finally:
        stop_process(process)
    rag_ms = statistics.median(r for r, _ in per_round)
    direct_ms = statistics.median(d for _, d in per_round)
    print(f"\nmedian over {args.rounds} rounds of the per-round median end-to-end latency:")
    print(f"  rag (domain, top-{TOP_K})  {rag_ms:8.1f} ms")
    print(f"  direct (same prompt) {direct_ms:8.1f} ms")
    print(f"  ratio {rag_ms / direct_ms:.3f}, added latency {100 * (rag_ms / direct_ms - 1):+.1f}% (target <= +10%)")
    print("  lorag's stage timings on the rag side (median ms): "
          + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in stage_ms.items()))


if __name__ == "__main__":
    main()
