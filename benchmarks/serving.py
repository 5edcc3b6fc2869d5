"""Serving benchmark: raw vLLM OpenAI server vs `lorag serve`, same model, adapters, engine args and load.

Real model (issue 11: SmolLM2-135M-Instruct as an HF folder, base + 2 adapters, concurrency 1 and 8):

    .venv/bin/python benchmarks/serving.py --model /tmp/smollm2-hf --adapters 2 --requests 32 --tokens 32 \\
        --rounds 2 --concurrency 1 8 --servers vllm lorag lorag-null lorag-nonull --workdir /tmp/lorag-bench-real

Tiny random model (built in the workdir; any overhead lorag adds shows clearly on it):

    .venv/bin/python benchmarks/serving.py [--requests 32] [--tokens 32] [--rounds 2] [--adapters 3]

The servers run one after the other in this one run (the order alternates per round);
the load is streamed chat completions with a fixed prompt, a fixed output length
(ignore_eos, greedy) and models cycling over the base model and the adapters
(random rank-8 LoRA on q/k/v/o, built once and cached in the workdir), at each
concurrency (the same number of requests per level). Both sides get the same vLLM
engine arguments: float32, enforce_eager, max_model_len, KV cache bytes, vLLM's
default stats logging, and as many LoRA slots (lorag's engine adds one slot for its
null adapter, so raw vLLM and `lorag-nonull` get --max-loras + 1). The AsyncEngineArgs
of the two sides were compared field by field (the resulting VllmConfig is the same;
only served_model_name's type and two unused multimodal/reasoning-parser defaults differ).

Servers: `vllm` (python -m vllm.entrypoints.openai.api_server), `lorag` (`lorag serve`,
plugins off, engine.base_via_null_adapter = "auto": on CPU, base requests use the null
adapter only once more than max_loras adapters have reached the engine, see
lorag/engine.py), `lorag-null` ("on": every base request through the null
adapter), `lorag-nonull` ("off": never; NOT adapter-safe on vLLM CPU with more adapters
than max_loras, measured only to price the null adapter), `lorag-nostats`
(engine.extra disable_log_stats = true), `lorag+plugins` (PII + blocklist + formatting
on). The first is the baseline.

Prints, per server and concurrency, medians over rounds of completion tokens/s, TTFT
and latency, and the ratios against the baseline; the peak memory of each server's
process tree (API process + engine core, sampled with psutil during the load: RSS sum
and PSS sum, PSS counting shared pages once); and the load average around each run.
Targets: lorag throughput >= 0.97x vLLM, TTFT <= 1.10x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorag.demo.devmodel import build_tiny_model  # noqa: E402
from tests.devserver import stop_process, wait_until_up  # noqa: E402
from tests.random_adapter import build_random_adapter  # noqa: E402

KV_BYTES = 512 << 20
PROMPT = "Explain the notice period a tenant must give before ending a lease, with an example."
SERVERS = ("vllm", "lorag", "lorag-null", "lorag-nonull", "lorag-nostats", "lorag+plugins")


@dataclass
class Result:
    server: str
    concurrency: int
    tokens_per_s: float
    ttft_ms: float
    latency_ms: float
    failures: int


@dataclass
class Memory:
    """Peak memory of a process tree, sampled in a background thread."""

    peak_rss: int = 0  # sum over the tree at the sample where it was largest
    peak_pss: int = 0
    peak_rss_by_role: dict[str, int] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vllm_command(model: Path, adapters: dict[str, Path], port: int, max_loras: int, max_model_len: int) -> list[str]:
    lora_modules = [f"{name}={path}" for name, path in adapters.items()]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "base", "--port", str(port), "--host", "127.0.0.1",
            "--dtype", "float32", "--max-model-len", str(max_model_len), "--enable-lora",
            "--max-loras", str(max_loras), "--max-lora-rank", "8", "--max-cpu-loras", str(max(2 * max_loras, 8)),
            "--kv-cache-memory-bytes", str(KV_BYTES), "--enforce-eager",
            "--lora-modules", *lora_modules]


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


def lorag_command(kind: str, model: Path, adapters: dict[str, Path], port: int, max_loras: int,
                  max_model_len: int, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """`lorag serve` with engine slots equal to raw vLLM's: max_loras + the null adapter's slot."""
    null_mode = {"lorag-nonull": "off", "lorag-null": "on"}.get(kind, "auto")
    lorag_max_loras = max_loras + 1 if null_mode == "off" else max_loras
    preload = "".join(f'[adapters.preload.{n}]\npath = "{p}"\n' for n, p in adapters.items())
    extra = "[engine.extra]\ndisable_log_stats = true\n" if kind == "lorag-nostats" else ""
    config = workdir / f"lorag-{port}.toml"
    config.write_text(f"""
state_dir = "{workdir / f'state-{port}'}"
[model]
path = "{model}"
name = "base"
dtype = "float32"
max_model_len = {max_model_len}
[engine]
max_loras = {lorag_max_loras}
max_lora_rank = 8
enforce_eager = true
kv_cache_memory_bytes = {KV_BYTES}
base_via_null_adapter = "{null_mode}"
{extra}[server]
port = {port}
{preload}{PLUGINS_ON if kind == "lorag+plugins" else PLUGINS_OFF}""")
    env = {"LORAG_LOG_LEVEL": "warning"}
    return [sys.executable, "-m", "lorag.cli", "serve", "--config", str(config)], env


def start(command: list[str], env: dict[str, str], url: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", **env})
    wait_until_up(process, url, log, probe="/v1/models")  # vLLM's own server has no /ready
    return process


class TreeSampler(threading.Thread):
    """Samples the RSS (every `every_s`) and PSS (every 4th sample) of a process and its descendants."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.memory = Memory()
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        tick = 0
        while not self._halt.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss, pss, by_role = 0, 0, {"api": 0, "engine": 0}
            for proc in processes:
                try:
                    size = proc.memory_info().rss
                    if tick % 4 == 0:
                        pss += proc.memory_full_info().pss
                except psutil.Error:
                    continue
                rss += size
                by_role["api" if proc.pid == self.root.pid else "engine"] += size
            if rss > self.memory.peak_rss:
                self.memory.peak_rss = rss
                self.memory.peak_rss_by_role = by_role
            self.memory.peak_pss = max(self.memory.peak_pss, pss)
            tick += 1
            self._halt.wait(self.every_s)

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds so far of each process in the tree, by role (api or its process title)."""
        import psutil

        totals: dict[str, float] = {}
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return totals
        for proc in processes:
            try:
                times = proc.cpu_times()
                role = "api" if proc.pid == self.root.pid else proc.name().removeprefix("VLLM::")
            except psutil.Error:
                continue
            totals[role] = totals.get(role, 0.0) + times.user + times.system
        return totals

    def stop(self) -> Memory:
        self._halt.set()
        self.join()
        return self.memory


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
            if "error" in data:  # a failure after the 200 (an error event) is a failure too
                raise httpx.HTTPError(str(data["error"].get("message")))
            if ttft is None and any(c.get("delta", {}).get("content") for c in data.get("choices", [])):
                ttft = time.perf_counter() - started
            if data.get("usage"):
                completion_tokens = data["usage"]["completion_tokens"]
    return ttft or 0.0, time.perf_counter() - started, completion_tokens


async def load_samples(url: str, models: list[str], concurrency: int, requests: int, tokens: int,
                       headers: dict[str, str] | None = None) -> tuple[float, list[float], list[float], int]:
    """(tokens/s, TTFTs s, latencies s, failures) of `requests` streamed chats at `concurrency`,
    after one warm-up request per model."""
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
            except (httpx.HTTPError, ValueError):
                failures += 1
                continue
            ttfts.append(ttft)
            latencies.append(latency)
            total_tokens += n

    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers,
                                 limits=httpx.Limits(max_connections=64)) as client:
        await asyncio.gather(*(one_request(client, m, 8) for m in dict.fromkeys(models)))  # warm up each model once
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return total_tokens / wall, ttfts, latencies, failures


async def load(url: str, models: list[str], concurrency: int, requests: int,
               tokens: int) -> tuple[float, float, float, int]:
    """(tokens/s, median TTFT ms, median latency ms, failures)."""
    throughput, ttfts, latencies, failures = await load_samples(url, models, concurrency, requests, tokens)
    return throughput, statistics.median(ttfts) * 1000, statistics.median(latencies) * 1000, failures


def py_spy(out_dir: Path, pid: int, name: str) -> subprocess.Popen:
    """py-spy sampling the API process (collapsed stacks, without pausing it) until SIGINT."""
    out_dir.mkdir(parents=True, exist_ok=True)
    executable = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(executable), "record", "--pid", str(pid), "--rate", "100", "--nonblocking",
                             "--format", "raw", "--output", str(out_dir / f"{name}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run_server(kind: str, args: argparse.Namespace, model: Path, adapters: dict[str, Path],
               workdir: Path) -> tuple[list[Result], Memory]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    slots = args.max_loras + 1  # raw vLLM's slots = lorag's engine slots (max_loras + the null adapter)
    if kind == "vllm":
        command, env = vllm_command(model, adapters, port, slots, args.max_model_len), dict[str, str]()
    else:
        command, env = lorag_command(kind, model, adapters, port, args.max_loras, args.max_model_len, workdir)
    log = workdir / f"{kind}-{port}.log"
    started = time.perf_counter()
    process = start(command, env, url, log)
    print(f"  {kind:<14} up in {time.perf_counter() - started:5.1f} s, load average {loadavg()}", flush=True)
    sampler = TreeSampler(process.pid)
    sampler.start()
    models = ["base", *adapters]
    try:
        results = []
        for concurrency in args.concurrency:
            profiler = py_spy(args.py_spy, process.pid, f"{kind}-c{concurrency}") if args.py_spy else None
            cpu_before = sampler.cpu_seconds()
            tps, ttft, latency, failures = asyncio.run(load(url, models, concurrency, args.requests, args.tokens))
            cpu = {role: seconds - cpu_before.get(role, 0.0) for role, seconds in sampler.cpu_seconds().items()}
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=60)
            results.append(Result(kind, concurrency, tps, ttft, latency, failures))
            # CPU per generated token (warm-up included in the window; both sides send the same warm-up)
            per_k = ", ".join(f"{role} {1000 * seconds / max(1, args.requests * args.tokens):.2f}"
                              for role, seconds in sorted(cpu.items()))
            print(f"  {kind:<14} c={concurrency:<3} {tps:8.1f} tok/s  ttft {ttft:7.1f} ms  "
                  f"latency {latency:8.1f} ms  failures {failures}  load average {loadavg()}\n"
                  f"  {'':<14}       CPU s per 1k tokens: {per_k}", flush=True)
        return results, sampler.stop()
    finally:
        sampler.stop()
        stop_process(process)


def median_of(results: list[Result], kind: str, concurrency: int, attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in results if r.server == kind and r.concurrency == concurrency)


def mib(n: float) -> str:
    return f"{n / (1 << 20):7.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="an HF model folder (default: a tiny random model built in the workdir)")
    parser.add_argument("--adapters", type=int, default=3, help="random LoRA adapters besides the base model")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-loras", type=int, default=None,
                        help="lorag's max_loras (default: --adapters); raw vLLM and lorag-nonull get one more "
                             "slot, as lorag's engine has (base requests use a null adapter there)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--servers", nargs="+", default=["vllm", "lorag", "lorag+plugins"], choices=SERVERS,
                        help="the first is the baseline of the ratios")
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the built model and adapters between runs")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="record each server's API process with py-spy (pip install py-spy) during each level "
                             "into DIR/<server>-c<N>.txt (collapsed stacks); it perturbs the timings")
    args = parser.parse_args()
    args.max_loras = args.max_loras or args.adapters

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorag-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model.resolve() if args.model else build_tiny_model(workdir / "tiny")
    names = [f"a{i + 1}" for i in range(args.adapters)]
    adapters = {name: build_random_adapter(model, workdir / f"{model.name}-{name}", seed=i + 1, rank=8)
                for i, name in enumerate(names)}
    print(f"model {model}, base + {len(adapters)} adapters, max_loras {args.max_loras} (+1 engine slot), "
          f"{args.requests} requests x {args.tokens} tokens per level, concurrency {args.concurrency}, "
          f"rounds={args.rounds}, workdir {workdir}, load average {loadavg()}", flush=True)
    results: list[Result] = []
    memories: dict[str, list[Memory]] = {kind: [] for kind in args.servers}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}", flush=True)
        order = args.servers if round_index % 2 == 0 else list(reversed(args.servers))
        for kind in order:
            server_results, memory = run_server(kind, args, model, adapters, workdir)
            results += server_results
            memories[kind].append(memory)
    baseline = args.servers[0]
    print(f"\nmedians over {args.rounds} rounds; ratios against {baseline}")
    print(f"{'server':<14} {'conc':>4} {'tok/s':>9} {'ttft ms':>9} {'lat ms':>9} {'tput x':>7} {'ttft x':>7}")
    for kind in args.servers:
        for c in args.concurrency:
            tps = median_of(results, kind, c, "tokens_per_s")
            ttft = median_of(results, kind, c, "ttft_ms")
            lat = median_of(results, kind, c, "latency_ms")
            base_tps = median_of(results, baseline, c, "tokens_per_s")
            base_ttft = median_of(results, baseline, c, "ttft_ms")
            print(f"{kind:<14} {c:>4} {tps:9.1f} {ttft:9.1f} {lat:9.1f} {tps / base_tps:7.3f} {ttft / base_ttft:7.3f}")
    print("\npeak memory of the server's process tree during the load (max over rounds), MiB")
    print(f"{'server':<14} {'RSS sum':>8} {'api RSS':>8} {'engine RSS':>10} {'PSS sum':>8}")
    for kind in args.servers:
        top = max(memories[kind], key=lambda m: m.peak_rss)
        pss = max(m.peak_pss for m in memories[kind])
        print(f"{kind:<14} {mib(top.peak_rss):>8} {mib(top.peak_rss_by_role.get('api', 0)):>8} "
              f"{mib(top.peak_rss_by_role.get('engine', 0)):>10} {mib(pss):>8}")
    if "lorag" in args.servers and "lorag+plugins" in args.servers:
        for c in args.concurrency:
            ratio = (median_of(results, "lorag+plugins", c, "tokens_per_s")
                     / median_of(results, "lorag", c, "tokens_per_s"))
            print(f"plugins on / off, c={c}: throughput x{ratio:.3f}")
    print(f"failed requests: {sum(r.failures for r in results)}; load average at the end {loadavg()}")


if __name__ == "__main__":
    main()
