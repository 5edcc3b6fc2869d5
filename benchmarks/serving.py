"""Serving benchmark: raw vLLM OpenAI server vs `lorag serve`, same model, adapters, engine args and load.

    .venv/bin/python benchmarks/serving.py [--requests 64] [--tokens 64] [--rounds 2]

Both servers run one after the other in this one run (alternating per round);
the load is streamed chat completions with a fixed prompt, a fixed output length
(ignore_eos) and models cycling over the base model and three adapters, at
concurrency 1 and 16. Prints medians over rounds and the lorag/vLLM ratios.
Targets: lorag throughput >= 0.95x vLLM, TTFT within +10%; plugins on (PII +
blocklist + formatting) >= 0.95x plugins off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorag.devmodel import build_random_adapter, build_tiny_model  # noqa: E402
from lorag.devserver import wait_until_up  # noqa: E402

ADAPTERS = ("a1", "a2", "a3")
MAX_MODEL_LEN = 512
KV_BYTES = 512 << 20
PROMPT = "Explain the notice period a tenant must give before ending a lease, with an example."


@dataclass
class Result:
    server: str
    concurrency: int
    tokens_per_s: float
    ttft_ms: float
    latency_ms: float
    failures: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vllm_command(model: Path, adapters: dict[str, Path], port: int, max_loras: int, extra_args: list[str]) -> list[str]:
    lora_modules = [f"{name}={path}" for name, path in adapters.items()]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "base", "--port", str(port), "--host", "127.0.0.1",
            "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enable-lora",
            "--max-loras", str(max_loras), "--max-lora-rank", "8", "--max-cpu-loras", str(max(2 * max_loras, 8)),
            "--kv-cache-memory-bytes", str(KV_BYTES), "--enforce-eager", "--disable-log-stats",
            "--lora-modules", *lora_modules, *extra_args]


PLUGINS_ON = """
[plugins]
default = ["pii", "blocklist", "formatting"]
[plugins.settings.blocklist]
terms = ["project falcon", "internal only"]
[plugins.settings.formatting]
style = "markdown"
"""
PLUGINS_OFF = """
[plugins]
default = []
"""


def lorag_command(model: Path, adapters: dict[str, Path], port: int, max_loras: int,
                  workdir: Path, plugins: bool) -> tuple[list[str], dict[str, str]]:
    preload = "".join(f'[adapters.preload.{n}]\npath = "{p}"\n' for n, p in adapters.items())
    config = workdir / f"lorag-{port}.toml"
    config.write_text(f"""
state_dir = "{workdir / f'state-{port}'}"
[model]
path = "{model}"
name = "base"
dtype = "float32"
max_model_len = {MAX_MODEL_LEN}
[engine]
max_loras = {max_loras}
max_lora_rank = 8
enforce_eager = true
kv_cache_memory_bytes = {KV_BYTES}
[server]
port = {port}
{preload}{PLUGINS_ON if plugins else PLUGINS_OFF}""")
    env = {"LORAG_LOG_LEVEL": "warning"}
    return [sys.executable, "-m", "lorag.cli", "serve", "--config", str(config)], env


def start(command: list[str], env: dict[str, str], url: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", **env})
    wait_until_up(process, url, log, probe="/v1/models")  # vLLM's own server has no /ready
    return process


async def one_request(client: httpx.AsyncClient, model: str, tokens: int) -> tuple[float, float, int]:
    """(ttft_s, latency_s, completion_tokens) of one streamed chat completion."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft = None
    completion_tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if ttft is None and any(c.get("delta", {}).get("content") for c in data.get("choices", [])):
                ttft = time.perf_counter() - started
            if data.get("usage"):
                completion_tokens = data["usage"]["completion_tokens"]
    return ttft or 0.0, time.perf_counter() - started, completion_tokens


async def load(url: str, concurrency: int, requests: int, tokens: int) -> tuple[float, float, float, int]:
    models = ["base", *ADAPTERS]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    ttfts: list[float] = []
    latencies: list[float] = []
    total_tokens = 0
    failures = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal total_tokens, failures
        while not queue.empty():
            i = queue.get_nowait()
            try:
                ttft, latency, n = await one_request(client, models[i % len(models)], tokens)
            except httpx.HTTPError:
                failures += 1
                continue
            ttfts.append(ttft)
            latencies.append(latency)
            total_tokens += n

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        await asyncio.gather(*(one_request(client, m, 8) for m in models))  # warm up every adapter
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return total_tokens / wall, statistics.median(ttfts) * 1000, statistics.median(latencies) * 1000, failures


def run_server(kind: str, args: argparse.Namespace, model: Path, adapters: dict[str, Path],
               workdir: Path) -> list[Result]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if kind == "vllm":
        command, env = vllm_command(model, adapters, port, args.max_loras + 1, []), {}
    else:
        command, env = lorag_command(model, adapters, port, args.max_loras, workdir, kind == "lorag+plugins")
    process = start(command, env, url, workdir / f"{kind}-{port}.log")
    try:
        results = []
        for concurrency in args.concurrency:
            requests = args.requests if concurrency == 1 else args.requests * 2
            tps, ttft, latency, failures = asyncio.run(load(url, concurrency, requests, args.tokens))
            results.append(Result(kind, concurrency, tps, ttft, latency, failures))
            print(f"  {kind:<14} c={concurrency:<3} {tps:8.1f} tok/s  ttft {ttft:7.1f} ms  "
                  f"latency {latency:8.1f} ms  failures {failures}", flush=True)
        return results
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def median_of(results: list[Result], kind: str, concurrency: int, field: str) -> float:
    return statistics.median(getattr(r, field) for r in results if r.server == kind and r.concurrency == concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-loras", type=int, default=3, help="lorag's max_loras; raw vLLM gets one more "
                        "slot, as lorag's engine does (base requests use a null adapter there).")
    parser.add_argument("--servers", nargs="+", default=["vllm", "lorag", "lorag+plugins"],
                        choices=["vllm", "lorag", "lorag+plugins"],
                        help="the first is the baseline of the ratios; lorag+plugins runs PII, blocklist, formatting")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorag-bench-"))
    model = build_tiny_model(workdir / "tiny")
    adapters = {name: build_random_adapter(model, workdir / name, seed=i + 1) for i, name in enumerate(ADAPTERS)}
    print(f"tiny model, {len(ADAPTERS)} adapters + base, {args.tokens} tokens/request, rounds={args.rounds}, "
          f"workdir {workdir}", flush=True)
    results: list[Result] = []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}", flush=True)
        order = args.servers if round_index % 2 == 0 else list(reversed(args.servers))
        for kind in order:
            results += run_server(kind, args, model, adapters, workdir)
    baseline = args.servers[0]
    print(f"\nmedians over rounds; ratios against {baseline}")
    print(f"{'server':<14} {'conc':>4} {'tok/s':>9} {'ttft ms':>9} {'lat ms':>9} {'tput x':>7} {'ttft x':>7}")
    for kind in args.servers:
        for c in args.concurrency:
            tps = median_of(results, kind, c, "tokens_per_s")
            ttft = median_of(results, kind, c, "ttft_ms")
            lat = median_of(results, kind, c, "latency_ms")
            base_tps = median_of(results, baseline, c, "tokens_per_s")
            base_ttft = median_of(results, baseline, c, "ttft_ms")
            print(f"{kind:<14} {c:>4} {tps:9.1f} {ttft:9.1f} {lat:9.1f} {tps / base_tps:7.3f} {ttft / base_ttft:7.3f}")
    failures = sum(r.failures for r in results)
    if "lorag" in args.servers and "lorag+plugins" in args.servers:
        for c in args.concurrency:
            ratio = (median_of(results, "lorag+plugins", c, "tokens_per_s")
                     / median_of(results, "lorag", c, "tokens_per_s"))
            print(f"plugins on / off, c={c}: throughput x{ratio:.3f}")
    print(f"failed requests: {failures}")


if __name__ == "__main__":
    main()
