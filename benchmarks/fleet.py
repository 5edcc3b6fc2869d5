"""Fleet benchmark: lorag's remote backend against the raw vLLM servers it fronts.

    .venv/bin/python benchmarks/fleet.py [--requests 96] [--tokens 32] [--rounds 6] [--workdir DIR]
    .venv/bin/python benchmarks/fleet.py --only overhead [--plugins off pii]
    .venv/bin/python benchmarks/fleet.py --only workers [--workers 2]

1. Overhead (baseline: the raw server): one vLLM OpenAI server (tiny random model, LoRA on),
   loaded with streamed chat completions at concurrency 16 over the base model and 3 adapters,
   directly and through `lorag serve` with `[engine] backend = "remote"` in front of that same
   server, alternating per round; lorag once with plugins off and once with the PII plugin on
   (`--plugins`), each side of a round in a rotating order. The server gets a LoRA slot per
   adapter plus lorag's null adapter. vLLM's CPU backend binds its model worker to its own
   cores (one of the two here): the benchmark keeps everything else (the server's API process
   and engine core, lorag, the load) off them, as a CPU deployment should, so neither side's
   figure depends on where the kernel happens to place a process. Prints per round tokens/s,
   TTFT and CPU seconds per 1k tokens of the server's API process and of lorag, then medians
   of the per-round ratios lorag / raw: throughput, TTFT, and lorag's CPU per 1k tokens over
   that of the raw server's API process in the same round. Targets: throughput >= 0.95x, TTFT
   <= 1.10x, CPU <= 0.2x with plugins off and <= 0.5x with PII on.
2. Routing (baseline: round-robin): two vLLM servers with --max-loras 2 (+1 for lorag's null
   adapter) and 4 adapters (--adapters), uniformly mixed, concurrency 16, through lorag with
   `routing = "round_robin"` and with `"least_loaded"` (adapter homes within a slack), the
   adapters in a seeded random order.
   Prints tokens/s and adapter loads per 1,000 requests: the times an adapter entered a
   server's GPU slots, as lorag's slot model counts them (LRU over max_loras slots per server;
   vLLM exposes no load counter).
3. Workers (baseline: `lorag serve` with one process): the overhead's server and load, through
   `lorag serve --workers N` and through one lorag process, alternating per round. Prints tokens/s,
   TTFT and lorag's CPU per 1k tokens (all its processes), then the median per-round ratio of
   throughput N workers / 1. Workers help where lorag's process is the bottleneck: a core of its
   own per worker. On a machine whose cores the server's model worker and API process already
   take, expect about 1x.

The machine is shared and noisy: read the ratios, measured in the same run, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


PLUGINS = {"off": "[]", "pii": '["pii"]'}  # lorag's [plugins] default, per --plugins choice


def lorag_config(workdir: Path, model: Path, servers: list[VllmServer], adapters: dict[str, Path], port: int,
                 routing: str, args: argparse.Namespace, plugins: str = "off") -> Path:
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
default = {PLUGINS[plugins]}
{preload}""")
    return config


def start_lorag(config: Path, port: int, log: Path, workers: int = 1) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "lorag.cli", "serve", "--config", str(config),
                                "--workers", str(workers)], stdout=log.open("wb"), stderr=subprocess.STDOUT)
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


def cpu_seconds(pid: int) -> dict[int, float]:
    """CPU per process of a process tree (a `--workers` lorag is a parent and N workers)."""
    process = psutil.Process(pid)
    seconds = {}
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            seconds[member.pid] = times.user + times.system
    return seconds


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU the processes alive at both looks spent between them (one that came or went is left out)."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def overhead(args: argparse.Namespace, model: Path, adapters: dict[str, Path], workdir: Path) -> None:
    print("== overhead: one vLLM server, raw vs through lorag (remote backend) ==", flush=True)
    chosen = dict(list(adapters.items())[:3])  # the base model and 3 adapters
    server = start_vllm_servers(model, BASE, workdir / "one", [free_port()], max_loras=len(chosen) + 1,
                                max_lora_rank=RANK)[0]
    sides = ["vllm", *(f"lorag-{p}" for p in args.plugins)]
    rows: dict[str, list[Row]] = {side: [] for side in sides}
    try:
        worker = model_cores(server)
        rest = keep_off(worker, server)
        print(f"  model worker on cores {sorted(worker) or 'any'}; API process, engine core, lorag and the "
              f"load on {sorted(rest) or 'any'}", flush=True)
        lorags: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for plugins in args.plugins:
                port = free_port()
                config = lorag_config(workdir / "one", model, [server], chosen, port, "least_loaded", args, plugins)
                lorags[f"lorag-{plugins}"] = start_lorag(config, port, workdir / "one" / f"lorag-{plugins}.log")
            for round_ in range(args.rounds):
                shift = round_ % len(sides)
                for side in sides[shift:] + sides[:shift]:
                    lorag = lorags.get(side)
                    row = measure(server, lorag[0].pid if lorag else None, lorag[1] if lorag else server.url,
                                  [BASE, *(f"{n}@v1" for n in chosen)], args)  # lorag loaded them as name@v1
                    rows[side].append(row)
                    print(f"  round {round_ + 1:<2} {side:<9} {row.tps:8.1f} tok/s  ttft {row.ttft:7.1f} ms  CPU s per "
                          f"1k tokens: server API {row.api_cpu:.3f}, lorag {row.lorag_cpu:.3f}  "
                          f"load average {loadavg()}", flush=True)
        finally:
            for process, _ in lorags.values():
                stop_process(process)
    finally:
        server.stop()
    report_overhead(rows)


@dataclass
class Row:
    """One side of one round: throughput, median TTFT, and CPU seconds per 1k streamed tokens."""

    tps: float
    ttft: float
    api_cpu: float  # the vLLM server's API process
    lorag_cpu: float  # lorag's process (0 on the raw side)


def measure(server: VllmServer, lorag_pid: int | None, url: str, models: list[str], args: argparse.Namespace) -> Row:
    """One load on `url`, with the CPU the server's API process and lorag (when in front) spent on it."""
    tokens = args.requests * args.tokens
    api_before = psutil.Process(server.process.pid).cpu_times()
    lorag_before = cpu_seconds(lorag_pid) if lorag_pid else {}
    tps, ttft = run_load(url, models, args)
    api_after = psutil.Process(server.process.pid).cpu_times()
    api_cpu = 1000 * (api_after.user + api_after.system - api_before.user - api_before.system) / tokens
    lorag_cpu = 1000 * cpu_spent(lorag_before, cpu_seconds(lorag_pid)) / tokens if lorag_pid else 0.0
    return Row(tps, ttft, api_cpu, lorag_cpu)


def report_overhead(rows: dict[str, list[Row]]) -> None:
    """Medians per side, then per-round ratios against the raw server (medians of the ratios)."""
    raw = rows.pop("vllm")
    print(f"  median  vllm      {statistics.median(r.tps for r in raw):8.1f} tok/s  ttft "
          f"{statistics.median(r.ttft for r in raw):7.1f} ms  server API CPU "
          f"{statistics.median(r.api_cpu for r in raw):.3f} s per 1k tokens", flush=True)
    targets = {"lorag-off": 0.2, "lorag-pii": 0.5}
    for side, via in rows.items():
        pairs = list(zip(raw, via, strict=True))
        print(f"  median  {side:<9} {statistics.median(r.tps for r in via):8.1f} tok/s  ttft "
              f"{statistics.median(r.ttft for r in via):7.1f} ms  lorag CPU {statistics.median(r.lorag_cpu for r in via):.3f}"
              f" s per 1k tokens (server API behind it {statistics.median(r.api_cpu for r in via):.3f})", flush=True)
        print(f"  ratio   {side}/vllm (median of {len(pairs)} rounds): throughput "
              f"{statistics.median(b.tps / a.tps for a, b in pairs):.3f}x (target >= 0.95), TTFT "
              f"{statistics.median(b.ttft / a.ttft for a, b in pairs):.3f}x (target <= 1.10), CPU per 1k tokens "
              f"lorag / vLLM API {statistics.median(b.lorag_cpu / a.api_cpu for a, b in pairs):.3f}x "
              f"(target <= {targets.get(side, 1.0)})", flush=True)


def workers(args: argparse.Namespace, model: Path, adapters: dict[str, Path], workdir: Path) -> None:
    print(f"== workers: one vLLM server, lorag with --workers {args.workers} vs 1 ==", flush=True)
    chosen = dict(list(adapters.items())[:3])
    server = start_vllm_servers(model, BASE, workdir / "workers", [free_port()], max_loras=len(chosen) + 1,
                                max_lora_rank=RANK)[0]
    sides = {1: "lorag-1", args.workers: f"lorag-{args.workers}"}
    rows: dict[int, list[Row]] = {count: [] for count in sides}
    try:
        rest = keep_off(model_cores(server), server)
        print(f"  lorag and the load on cores {sorted(rest) or 'any'}", flush=True)
        lorags: dict[int, tuple[subprocess.Popen, str]] = {}
        try:
            for count in sides:
                port = free_port()
                config = lorag_config(workdir / "workers", model, [server], chosen, port, "least_loaded", args)
                lorags[count] = start_lorag(config, port, workdir / "workers" / f"lorag-w{count}.log", workers=count)
            for round_ in range(args.rounds):
                order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
                for count in order:
                    process, url = lorags[count]
                    row = measure(server, process.pid, url, [BASE, *(f"{n}@v1" for n in chosen)], args)
                    rows[count].append(row)
                    print(f"  round {round_ + 1:<2} {sides[count]:<9} {row.tps:8.1f} tok/s  ttft {row.ttft:7.1f} ms  "
                          f"lorag CPU {row.lorag_cpu:.3f} s per 1k tokens  load average {loadavg()}", flush=True)
        finally:
            for process, _ in lorags.values():
                stop_process(process)
    finally:
        server.stop()
    for count, name in sides.items():
        print(f"  median  {name:<9} {statistics.median(r.tps for r in rows[count]):8.1f} tok/s  ttft "
              f"{statistics.median(r.ttft for r in rows[count]):7.1f} ms  lorag CPU "
              f"{statistics.median(r.lorag_cpu for r in rows[count]):.3f} s per 1k tokens", flush=True)
    pairs = list(zip(rows[1], rows[args.workers], strict=True))
    print(f"  ratio   --workers {args.workers} / 1 (median of {len(pairs)} rounds): throughput "
          f"{statistics.median(b.tps / a.tps for a, b in pairs):.3f}x, TTFT "
          f"{statistics.median(b.ttft / a.ttft for a, b in pairs):.3f}x", flush=True)


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
    parser.add_argument("--only", choices=["overhead", "routing", "workers"])
    parser.add_argument("--workers", type=int, default=2, help="workers: lorag's processes against 1")
    parser.add_argument("--plugins", nargs="+", choices=sorted(PLUGINS), default=["off", "pii"],
                        help="overhead: lorag's plugins, one lorag per choice (pii: the PII plugin on)")
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
    if args.only in (None, "workers"):
        workers(args, model, adapters, workdir)
    if args.only in (None, "routing"):
        routing(args, model, adapters, workdir)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
