"""Fleet benchmark: lorag's remote backend against the raw vLLM servers it fronts.

    .venv/bin/python benchmarks/fleet.py [--requests 96] [--tokens 32] [--rounds 6] [--workdir DIR]

1. Overhead (baseline: the raw server): one vLLM OpenAI server (tiny random model, LoRA on),
   loaded with streamed chat completions at concurrency 16 over the base model and 3 adapters,
   directly and through `lorag serve` with `[engine] backend = "remote"` in front of that same
   server, alternating per round. The server gets a LoRA slot per adapter plus lorag's null
   adapter. vLLM's CPU backend binds its model worker to its own cores (one of the two here):
   the benchmark keeps everything else (the server's API process and engine core, lorag, the
   load) off them, as a CPU deployment should, so neither side's figure depends on where the
   kernel happens to place a process. Prints per round tokens/s, TTFT and CPU seconds per 1k
   tokens of the server's API process and of lorag, then medians of the per-round ratios
   lorag / raw. Targets: throughput >= 0.95x, TTFT <= 1.10x.
2. Routing (baseline: round-robin): two vLLM servers with --max-loras 2 (+1 for lorag's null
   adapter) and 4 adapters (--adapters), uniformly mixed, concurrency 16, through lorag with
   `routing = "round_robin"` and with `"least_loaded"` (adapter homes within a slack), the
   adapters in a seeded random order.
   Prints tokens/s and adapter loads per 1,000 requests: the times an adapter entered a
   server's GPU slots, as lorag's slot model counts them (LRU over max_loras slots per server;
   vLLM exposes no load counter).

The machine is shared and noisy: read the ratios, measured in the same run, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving import free_port, load, loadavg  # noqa: E402

from lorag.demo.devmodel import build_tiny_model  # noqa: E402
from tests.devserver import stop_process, wait_until_up  # noqa: E402
from tests.random_adapter import build_random_adapter  # noqa: E402
from tests.vllm_servers import VllmServer, start_vllm_servers  # noqa: E402

MAX_LORAS = 2
RANK = 8
BASE = "base"


def lorag_config(workdir: Path, model: Path, servers: list[VllmServer], adapters: dict[str, Path], port: int,
                 routing: str, args: argparse.Namespace) -> Path:
    preload = "".join(f'[adapters.preload.{n}]\npath = "{p}"\n' for n, p in adapters.items())
    entries = "".join(f'[[engine.servers]]\nurl = "{s.url}"\nname = "vllm-{i}"\n' for i, s in enumerate(servers))
    config = workdir / f"lorag-{port}.toml"
    config.write_text(f"""
state_dir = "{workdir / 'state'}"
[model]
path = "{model}"
name = "{BASE}"
max_model_len = 512
[engine]
backend = "remote"
base_via_null_adapter = "{args.null}"
max_loras = {MAX_LORAS}
max_lora_rank = {RANK}
{entries}[engine.fleet]
routing = "{routing}"
stream_interval = {args.stream_interval}
[server]
port = {port}
[plugins]
default = []
{preload}""")
    return config


def start_lorag(config: Path, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "lorag.cli", "serve", "--config", str(config)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_until_up(process, url, log, probe="/ready", timeout_s=300)
    return process, url


def fleet_counts(url: str) -> dict[str, dict[str, int]]:
    servers = httpx.get(f"{url}/admin/fleet").json()["servers"]  # no keys: loopback, open
    return {s["name"]: {"requests": s["requests"], "adapter_loads": s["adapter_loads"]} for s in servers}


def run_load(url: str, models: list[str], args: argparse.Namespace) -> tuple[float, float]:
    tps, ttft, _latency, failures = asyncio.run(load(url, models, args.concurrency, args.requests, args.tokens))
    if failures:
        print(f"    {failures} requests failed", flush=True)
    return tps, ttft


def model_cores(server: VllmServer) -> set[int]:
    """The cores vLLM's CPU backend bound its model worker's threads to (none: it bound nothing)."""
    workers = [p for p in psutil.Process(server.process.pid).children(recursive=True) if "Worker" in p.name()]
    cores = {core for worker in workers for core in worker.cpu_affinity()}
    return cores if cores != set(range(psutil.cpu_count() or 1)) else set()


def keep_off(cores: set[int], server: VllmServer) -> set[int]:
    """Pin this process (so lorag and the load, started after) and the server's other processes
    to the cores the model worker does not use; the cores used, empty when none are left."""
    rest = set(range(psutil.cpu_count() or 1)) - cores
    if not cores or not rest:
        return set()
    main = psutil.Process(server.process.pid)
    for process in [psutil.Process(), main, *main.children(recursive=True)]:
        if "Worker" not in process.name():
            process.cpu_affinity(sorted(rest))
    return rest


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def overhead(args: argparse.Namespace, model: Path, adapters: dict[str, Path], workdir: Path) -> None:
    print("== overhead: one vLLM server, raw vs through lorag (remote backend) ==", flush=True)
    chosen = dict(list(adapters.items())[:3])  # the base model and 3 adapters
    server = start_vllm_servers(model, BASE, workdir / "one", [free_port()], max_loras=len(chosen) + 1,
                                max_lora_rank=RANK)[0]
    try:
        worker = model_cores(server)
        rest = keep_off(worker, server)
        print(f"  model worker on cores {sorted(worker) or 'any'}; API process, engine core, lorag and the "
              f"load on {sorted(rest) or 'any'}", flush=True)
        port = free_port()
        lorag, url = start_lorag(lorag_config(workdir / "one", model, [server], chosen, port, "least_loaded", args),
                                 port, workdir / "one" / "lorag.log")
        rows: dict[str, list[tuple[float, float, float, float]]] = {"vllm": [], "lorag": []}
        tokens = args.requests * args.tokens
        try:
            for round_ in range(args.rounds):
                for side in (["vllm", "lorag"] if round_ % 2 == 0 else ["lorag", "vllm"]):
                    target = server.url if side == "vllm" else url
                    # The same adapters on the same server: lorag loaded them there as name@v1.
                    models = [BASE, *(f"{n}@v1" for n in chosen)]
                    api_before, lorag_before = cpu_seconds(server.process.pid), cpu_seconds(lorag.pid)
                    tps, ttft = run_load(target, models, args)
                    api_cpu = 1000 * (cpu_seconds(server.process.pid) - api_before) / tokens
                    lorag_cpu = 1000 * (cpu_seconds(lorag.pid) - lorag_before) / tokens
                    rows[side].append((tps, ttft, api_cpu, lorag_cpu))
                    print(f"  round {round_ + 1:<2} {side:<6} {tps:8.1f} tok/s  ttft {ttft:7.1f} ms  CPU s per 1k "
                          f"tokens: server API {api_cpu:.3f}, lorag {lorag_cpu:.3f}  load average {loadavg()}",
                          flush=True)
        finally:
            stop_process(lorag)
    finally:
        server.stop()
    raw, via = rows["vllm"], rows["lorag"]
    print(f"  median      vllm {statistics.median(r[0] for r in raw):8.1f} tok/s ttft "
          f"{statistics.median(r[1] for r in raw):7.1f} ms | lorag {statistics.median(r[0] for r in via):8.1f} tok/s "
          f"ttft {statistics.median(r[1] for r in via):7.1f} ms; lorag's own CPU "
          f"{statistics.median(r[3] for r in via):.3f} s per 1k tokens (the server's API process: "
          f"{statistics.median(r[2] for r in raw):.3f})", flush=True)
    throughput = statistics.median(b[0] / a[0] for a, b in zip(raw, via, strict=True))
    ttft = statistics.median(b[1] / a[1] for a, b in zip(raw, via, strict=True))
    print(f"  ratio lorag/vllm (median of {len(raw)} rounds): throughput {throughput:.3f}x (target >= 0.95), "
          f"TTFT {ttft:.3f}x (target <= 1.10)", flush=True)


def routing(args: argparse.Namespace, model: Path, adapters: dict[str, Path], workdir: Path) -> None:
    print(f"== routing: two vLLM servers, {len(adapters)} adapters, max_loras {MAX_LORAS} ==", flush=True)
    servers = start_vllm_servers(model, BASE, workdir / "two", [free_port(), free_port()],
                                 max_loras=MAX_LORAS + 1, max_lora_rank=RANK)
    # A seeded random mix (a fixed cycle would hand round-robin a perfect partition by accident).
    rng = random.Random(7)
    names = [f"{n}@v1" for n in adapters]
    models = [rng.choice(names) for _ in range(args.requests)]
    rows: dict[str, list[tuple[float, float]]] = {"round_robin": [], "least_loaded": []}
    try:
        for round_ in range(args.rounds):
            for policy in (["round_robin", "least_loaded"] if round_ % 2 == 0 else ["least_loaded", "round_robin"]):
                port = free_port()
                lorag, url = start_lorag(lorag_config(workdir / "two", model, servers, adapters, port, policy, args),
                                         port, workdir / "two" / f"lorag-{policy}.log")
                try:
                    before = fleet_counts(url)
                    tps, _ = run_load(url, models, args)
                    after = fleet_counts(url)
                finally:
                    stop_process(lorag)
                requests = sum(after[s]["requests"] - before[s]["requests"] for s in after)
                loads = sum(after[s]["adapter_loads"] - before[s]["adapter_loads"] for s in after)
                per_k = 1000 * loads / max(requests, 1)
                rows[policy].append((tps, per_k))
                print(f"  round {round_ + 1} {policy:<13} {tps:8.1f} tok/s  adapter loads per 1k requests "
                      f"{per_k:6.1f}  load average {loadavg()}", flush=True)
    finally:
        for server in servers:
            server.stop()
    for policy, values in rows.items():
        print(f"  median {policy:<13} {statistics.median(v[0] for v in values):8.1f} tok/s  "
              f"{statistics.median(v[1] for v in values):6.1f} adapter loads per 1k requests", flush=True)
    rr = statistics.median(v[0] for v in rows["round_robin"])
    ll = statistics.median(v[0] for v in rows["least_loaded"])
    print(f"  ratio least_loaded/round_robin: throughput {ll / rr:.3f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--adapters", type=int, default=4, help="for routing: more than max_loras per server")
    parser.add_argument("--only", choices=["overhead", "routing"])
    parser.add_argument("--null", choices=["auto", "on", "off"], default="auto",
                        help="lorag's engine.base_via_null_adapter (remote: auto = on)")
    parser.add_argument("--stream-interval", type=int, default=1, help="lorag's engine.fleet.stream_interval")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorag-fleet-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_tiny_model(workdir / "tiny-llama")
    adapters = {f"a{i}": build_random_adapter(model, workdir / "adapters" / f"a{i}", seed=i + 1, rank=RANK)
                for i in range(args.adapters)}
    print(f"workdir {workdir}; model and {len(adapters)} adapters ready; load average {loadavg()}", flush=True)
    if args.only in (None, "overhead"):
        overhead(args, model, adapters, workdir)
    if args.only in (None, "routing"):
        routing(args, model, adapters, workdir)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
