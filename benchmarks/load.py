"""Load under change: many chat requests over mixed models while adapters come and go and a document is ingested.

    .venv/bin/python benchmarks/load.py [--requests 2000] [--concurrency 32] [--models base,a1,a2,a3]

Starts its own `lorag serve` on loopback (the tiny model from lorag.demo.devmodel, three
adapters, two adapter slots so they swap), then:
1. solo: each (model, prompt) once, alone, greedy -> the reference answers;
2. load: `--requests` chat completions (every fourth one streamed) at `--concurrency`,
   cycling over `--models`, while an admin loop registers, activates and removes
   versions of a `churn` adapter and a document is ingested into a knowledge base.
Checks: no failed request except 429s; every answer equals its model's solo answer
(an answer equal to another model's solo answer is a wrong-adapter answer); RSS of the
server (and of its engine processes) at start and end. Prints requests, failures,
p50/p99 latency and RSS; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorag.demo.devmodel import build_tiny_model  # noqa: E402
from tests.devserver import stop_process, wait_until_up  # noqa: E402
from tests.random_adapter import build_random_adapter  # noqa: E402

ADMIN_KEY = "sk-load-admin-key"
USER_KEY = "sk-load-user-key"
BASE = "base"
ADAPTERS = ("a1", "a2", "a3")
CHURN_SOURCES = ("churn1", "churn2")
KB = "loadkb"  # ingested during the load
DOMAIN_KB = "policies"  # the domains' knowledge, ingested before the solo answers (so it does not change)
DOMAINS = ("legal", "medical", "support", "general", "auto")
PROMPTS = (
    "What notice must a tenant give before ending a lease?",
    "Summarise the patient's symptoms in one line.",
    "Why did the bond yield rise?",
    "How do I reset my password?",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(workdir: Path, model: Path, adapters: dict[str, Path], docs: Path, port: int) -> Path:
    preload = "".join(f'[adapters.preload.{name}]\npath = "{path}"\n' for name, path in adapters.items())
    config = workdir / "lorag.toml"
    config.write_text(f"""
state_dir = "{workdir / 'state'}"
[model]
path = "{model}"
name = "{BASE}"
max_model_len = 512
[engine]
max_loras = 2
max_lora_rank = 8
enforce_eager = true
kv_cache_memory_bytes = {256 << 20}
[server]
host = "127.0.0.1"
port = {port}
api_keys = [
  {{ key = "{ADMIN_KEY}", name = "ops", admin = true }},
  {{ key = "{USER_KEY}", name = "load" }},
]
[adapters]
allowed_roots = ["{workdir}"]
{preload}
[knowledge.ingest]
allowed_roots = ["{docs}"]

[domains.legal]
description = "Tenancy law: leases, notice, landlords."
adapter = "a1"
knowledge = {{ bases = ["{DOMAIN_KB}"], top_k = 2 }}
[domains.medical]
description = "Medicine: patients, symptoms, doses."
adapter = "a2"
[domains.support]
description = "Customer support: passwords, accounts, tickets."
adapter = "a3"
knowledge = {{ bases = ["{DOMAIN_KB}"], top_k = 1 }}
[domains.general]
[routing]
fallback = "general"
""")
    return config


def start_server(config: Path, url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "LORAG_LOG_LEVEL": "warning", "VLLM_LOGGING_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "lorag.cli", "serve", "--config", str(config)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=config.parent)
    wait_until_up(process, url, log)
    return process


def rss_mb(pid: int) -> tuple[float, float]:
    """(server process, server + its children: the engine) resident memory in MiB."""
    process = psutil.Process(pid)
    own = process.memory_info().rss
    children = 0
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            children += child.memory_info().rss
    return own / 2**20, (own + children) / 2**20


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    wrong_adapter: list[str] = field(default_factory=list)
    drifted: list[str] = field(default_factory=list)  # differs from solo but is no other model's answer
    admin: Counter[str] = field(default_factory=Counter)
    admin_failures: list[str] = field(default_factory=list)
    rss: dict[str, tuple[float, float]] = field(default_factory=dict)  # moment -> rss_mb()


async def ask(client: httpx.AsyncClient, model: str, prompt: str, tokens: int, stream: bool) -> tuple[int, str]:
    """(status, answer text or error message) of one greedy chat completion."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    if not stream:
        response = await client.post("/v1/chat/completions", json=body)
        data = response.json()
        if response.status_code != 200:
            return response.status_code, str(data.get("error", {}).get("message"))
        return 200, str(data["choices"][0]["message"]["content"])
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, str(response.json().get("error", {}).get("message"))
        done = False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if "error" in data:
                    return 500, f"stream error: {data['error'].get('message')}"
                for choice in data.get("choices", []):
                    text += choice.get("delta", {}).get("content") or ""
        if not done:
            return 599, "stream ended without [DONE]"
    return 200, text


async def solo_answers(client: httpx.AsyncClient, models: list[str], tokens: int) -> dict[tuple[str, str], str]:
    answers = {}
    for model in models:
        for prompt in PROMPTS:
            status, text = await ask(client, model, prompt, tokens, stream=False)
            if status != 200:
                raise RuntimeError(f"solo request to {model} failed: {status} {text}")
            answers[(model, prompt)] = text
    return answers


async def churn(admin: httpx.AsyncClient, sources: dict[str, Path], stop: asyncio.Event, tally: Tally,
                interval_s: float) -> None:
    """Register, activate and remove versions of the `churn` adapter until the load is over."""
    version = 0
    while not stop.is_set():
        version += 1
        source = sources[CHURN_SOURCES[version % 2]]
        steps = [("register", "POST", "/admin/adapters", {"name": "churn", "path": str(source), "version": f"v{version}"})]
        if version > 1:
            steps.append(("activate", "POST", "/admin/adapters/churn/activate", {"version": f"v{version - 1}"}))
        if version > 2:
            steps.append(("remove", "DELETE", f"/admin/adapters/churn?version=v{version - 2}", None))
        for name, method, path, body in steps:
            response = await admin.request(method, path, json=body)
            tally.admin[name] += 1
            if response.status_code >= 300:
                tally.admin_failures.append(f"{name} {path}: {response.status_code} {response.text[:200]}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)


async def ingest(admin: httpx.AsyncClient, docs: Path, after: asyncio.Event, tally: Tally, pid: int) -> None:
    """Once the load is under way: ingest the document, then query it. The first ingestion loads the
    embedding model into the server, so RSS is sampled again after it (the baseline for "stable")."""
    await after.wait()
    response = await admin.post(f"/v1/knowledge/{KB}/ingest", json={"paths": [str(docs)], "create": True})
    tally.admin["ingest"] += 1
    if response.status_code != 200:
        tally.admin_failures.append(f"ingest: {response.status_code} {response.text[:200]}")
        return
    hits = await admin.post(f"/v1/knowledge/{KB}/query", json={"query": "notice period", "top_k": 1})
    tally.admin["query"] += 1
    if hits.status_code != 200 or not hits.json().get("hits"):
        tally.admin_failures.append(f"query after ingest: {hits.status_code} {hits.text[:200]}")
    tally.rss["after ingest"] = rss_mb(pid)


async def run_load(url: str, args: argparse.Namespace, models: list[str], sources: dict[str, Path], docs: Path,
                   tally: Tally, pid: int) -> float:
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits,
                                 headers={"authorization": f"Bearer {USER_KEY}"}) as client, \
            httpx.AsyncClient(base_url=url, timeout=300, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        created = await admin.post(f"/v1/knowledge/{DOMAIN_KB}/ingest",
                                   json={"paths": [str(docs / DOMAIN_KB)], "create": True})
        created.raise_for_status()
        solo = await solo_answers(client, models, args.max_tokens)
        tally.rss["warm"] = rss_mb(pid)  # engine, embedding model and adapters loaded: the baseline
        answers_of = {text: model for (model, _), text in solo.items()}
        print(f"solo answers: {len(solo)} ({len(set(solo.values()))} distinct)", flush=True)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.requests):
            queue.put_nowait(i)
        stop, quarter = asyncio.Event(), asyncio.Event()

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                if i >= args.requests // 4:
                    quarter.set()
                model, prompt = models[i % len(models)], PROMPTS[(i // len(models)) % len(PROMPTS)]
                started = time.perf_counter()
                try:
                    status, text = await ask(client, model, prompt, args.max_tokens, stream=i % 4 == 0)
                except (httpx.HTTPError, ValueError) as err:
                    status, text = 598, repr(err)
                tally.latencies.append(time.perf_counter() - started)
                tally.statuses[status] += 1
                if status == 429:
                    continue
                if status != 200:
                    tally.failures.append(f"{model}: {status} {text[:200]}")
                elif text != solo[(model, prompt)]:
                    other = answers_of.get(text)
                    (tally.wrong_adapter if other else tally.drifted).append(f"{model} answered like {other}")

        started = time.perf_counter()
        background = [asyncio.create_task(churn(admin, sources, stop, tally, args.churn_interval)),
                      asyncio.create_task(ingest(admin, docs, quarter, tally, pid))]
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
        stop.set()
        quarter.set()
        await asyncio.gather(*background)
        return wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--models", default=",".join((BASE, *ADAPTERS, *DOMAINS)),
                        help="comma-separated models to cycle over (the base model, adapters, domains, auto)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--churn-interval", type=float, default=1.0, help="seconds between adapter churn rounds")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorag-load-"))
    model = build_tiny_model(workdir / "tiny")
    adapters = {name: build_random_adapter(model, workdir / name, seed=i + 1) for i, name in enumerate(ADAPTERS)}
    sources = {name: build_random_adapter(model, workdir / name, seed=10 + i) for i, name in enumerate(CHURN_SOURCES)}
    docs = workdir / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "lease.md").write_text("# Leases\n\nA tenant may end a lease with thirty days written notice.\n")
    (docs / DOMAIN_KB).mkdir(exist_ok=True)
    (docs / DOMAIN_KB / "policy.md").write_text(
        "# Notice\n\nTenants give thirty days notice in writing.\n\n# Passwords\n\nReset it under settings.\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "server.log"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print(f"{args.requests} requests, concurrency {args.concurrency}, models {models}, workdir {workdir}", flush=True)
    process = start_server(write_config(workdir, model, adapters, docs, port), url, log)
    tally = Tally()
    try:
        tally.rss["start"] = rss_mb(process.pid)
        wall = asyncio.run(run_load(url, args, models, sources, docs, tally, process.pid))
        tally.rss["end"] = rss_mb(process.pid)
    finally:
        code = stop_process(process, timeout_s=90)

    answered = sum(tally.statuses.values())
    print(f"requests {answered} in {wall:.1f} s ({answered / wall:.1f}/s); statuses {dict(tally.statuses)}")
    print(f"failures {len(tally.failures)} (429s not counted: {tally.statuses[429]})")
    print(f"wrong-adapter answers {len(tally.wrong_adapter)}; other differences from solo {len(tally.drifted)}")
    print(f"latency p50 {percentile(tally.latencies, 0.5) * 1000:.0f} ms, "
          f"p99 {percentile(tally.latencies, 0.99) * 1000:.0f} ms, mean {statistics.mean(tally.latencies) * 1000:.0f} ms")
    moments = ("start", "warm", "after ingest", "end")
    print("RSS MiB (" + " -> ".join(moments) + "): server "
          + " -> ".join(f"{tally.rss[m][0]:.0f}" for m in moments if m in tally.rss)
          + "; with engine " + " -> ".join(f"{tally.rss[m][1]:.0f}" for m in moments if m in tally.rss))
    print(f"admin operations {dict(tally.admin)}; admin failures {len(tally.admin_failures)}; server exit code {code}")
    for problem in (tally.failures + tally.wrong_adapter + tally.drifted + tally.admin_failures)[:10]:
        print("  ", problem)
    bad = tally.failures or tally.wrong_adapter or tally.drifted or tally.admin_failures or code != 0
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
