"""Serving during a job: chat throughput and TTFT on one `lorag serve`, idle and while a fine-tuning job trains.

Tiny random model (tests' tiny-llama, cached under .lorag-test-models):

    .venv/bin/python benchmarks/finetune_serving.py [--rounds 3] [--requests 32] [--concurrency 8] [--tokens 32] \\
        [--threads 1] [--settle 5] [--nobind]

Real model (SmolLM2-135M-Instruct as tests/test_real_model.py's `lorag demo --setup-only` imports it into
.lorag-test-models/real-demo; the set-up runs first when that folder lacks the model):

    .venv/bin/python benchmarks/finetune_serving.py --real [--rounds 3]

One server for the whole run (plugins off, `[fine_tuning] threads = --threads`, max_concurrent 1,
save_steps 0, canary off), and rounds of two windows each, in this order: idle, training, idle,
training, ... A window is `--requests` streamed chat completions (base model, fixed prompt, greedy,
`--tokens` tokens with ignore_eos) at `--concurrency`, after one warm-up request (and one whole
window, not counted, before the first round: a fresh server's first load is slower).
- idle: no job runs (no `lorag.finetune.worker` process of this server is alive).
- training: a new job (one per window) is created through the OpenAI API (/v1/files, /v1/fine_tuning/jobs; supervised,
  a few hundred examples, 256 epochs, batch 1: far longer than the window). The benchmark waits for
  its first metrics event, measures the worker alone for `--settle` seconds (its CPU and steps/s
  without serving load), then runs the window, checks the job is still `running` and its worker
  alive, and cancels it (waiting for the worker to exit before the next idle window).
CPU use comes from psutil: the worker (found by its /proc cmdline, `lorag.finetune.worker <job dir>`)
and the server's own process tree without the worker (API process + vLLM engine), in cores
(CPU seconds / wall seconds of the window).

Prints one line per window, then medians over rounds per mode: tokens/s, TTFT p50 and p95, latency
p50, server cores, worker cores (alone and under load; and the peak over any --sample-s interval)
and training steps/s (alone and under load);
the ratios training / idle of throughput and TTFT p50 / p95; and the worker's threads and CPU
affinity next to the engine's, so the thread cap (`--threads`, ~1 core at 1) can be read off.
The machine is shared and noisy: read the ratios, measured in the same run, not the absolutes.
On the tiny model a window of the default 32 requests lasts under a second: take --requests 256
(or more rounds) there for figures that mean something; the real model's windows last seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving import free_port, load_samples, loadavg  # noqa: E402

from lorag.demo.devmodel import build_tiny_model  # noqa: E402
from tests.devserver import stop_process, wait_until_up  # noqa: E402
from tests.finetune_data import ANSWER, QUESTIONS, chat_lines, write_jsonl  # noqa: E402

MODELS = Path(os.environ.get("LORAG_TEST_MODELS", ROOT / ".lorag-test-models"))  # as tests/conftest.py
REAL_STATE = MODELS / "real-demo"
REAL_BASE = "smollm2-135m-instruct"
BASE = "base"
ADMIN_KEY = "sk-ftbench-admin"
TUNER_KEY = "sk-ftbench-tuner"
USER_KEY = "sk-ftbench-user"
WORKER_MODULE = "lorag.finetune.worker"
EXAMPLES = 384  # per epoch: with 256 epochs at batch 1 the job outlasts any window
EPOCHS = 256
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class Window:
    mode: str  # "idle" | "training"
    round: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    latency_p50_ms: float
    failures: int
    server_cores: float  # API process + engine, CPU s / wall s
    worker_cores: float | None = None  # under load
    worker_steps_per_s: float | None = None
    alone_cores: float | None = None  # the worker before the load (--settle s)
    alone_steps_per_s: float | None = None
    worker_threads: int | None = None
    worker_peak_cores: float | None = None  # the most over any --sample-s interval, alone or under load
    seconds: float = 0.0  # the window's wall time


# -- model and server ------------------------------------------------------------------------


def real_model() -> Path:
    """SmolLM2-135M-Instruct as the demo's set-up imports it (run once, reused, like tests' real_setup)."""
    folder = REAL_STATE / "models" / REAL_BASE
    if not (folder / "config.json").is_file():
        print(f"setting up {REAL_STATE} with `lorag demo --setup-only` (minutes: it imports and trains)", flush=True)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("LORAG_")}, "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([sys.executable, "-m", "lorag.cli", "demo", "--setup-only", "--state-dir",
                               str(REAL_STATE), "--port", str(free_port())], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"lorag demo --setup-only failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return folder


def write_config(workdir: Path, model: Path, port: int, args: argparse.Namespace) -> Path:
    config = workdir / "lorag.toml"
    config.write_text(f"""
state_dir = "{workdir / 'state'}"
[model]
path = "{model}"
name = "{BASE}"
dtype = "float32"
max_model_len = 512
[engine]
max_loras = 2
max_lora_rank = 8
enforce_eager = true
kv_cache_memory_bytes = {(512 if args.real else 256) << 20}
[server]
host = "127.0.0.1"
port = {port}
api_keys = [
  {{ key = "{ADMIN_KEY}", name = "ops", admin = true }},
  {{ key = "{TUNER_KEY}", name = "tuner", fine_tune = true }},
  {{ key = "{USER_KEY}", name = "app" }},
]
[plugins]
default = []
[fine_tuning]
threads = {args.threads}
max_concurrent = 1
save_steps = 0
keep_checkpoints = 1
canary_prompts = 0
""")
    return config


def start_server(config: Path, url: str, log: Path, nobind: bool) -> subprocess.Popen:
    env = {**os.environ, "LORAG_LOG_LEVEL": "warning", "VLLM_LOGGING_LEVEL": "WARNING",
           "TOKENIZERS_PARALLELISM": "false"}
    if nobind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    process = subprocess.Popen([sys.executable, "-m", "lorag.cli", "serve", "--config", str(config)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=config.parent)
    wait_until_up(process, url, log, timeout_s=600)
    return process


# -- processes and CPU -----------------------------------------------------------------------


def worker_pids(state_dir: Path, job_id: str | None = None) -> list[int]:
    """Live fine-tuning workers of this server (of one job), by their /proc cmdline."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue
        if WORKER_MODULE in command and str(state_dir) in command and (job_id is None or job_id in command):
            with contextlib.suppress(psutil.Error):
                if psutil.Process(int(proc.name)).status() != psutil.STATUS_ZOMBIE:
                    found.append(int(proc.name))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


class PeakSampler(threading.Thread):
    """The most cores a process used over any `every_s` interval, sampled until stop()."""

    def __init__(self, pid: int, every_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak = pid, every_s, 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        last_cpu, last_t = cpu_seconds([self.pid]), time.perf_counter()
        while not self._halt.wait(self.every_s):
            cpu, now = cpu_seconds([self.pid]), time.perf_counter()
            self.peak = max(self.peak, (cpu - last_cpu) / (now - last_t))
            last_cpu, last_t = cpu, now

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak


def server_pids(server: subprocess.Popen, exclude: set[int]) -> list[int]:
    """The server's process tree (API process, vLLM engine core and its workers), without fine-tuning workers.

    A cancelled worker stays a zombie (holding all its CPU time) until the server reaps it: never counted.
    """
    try:
        root = psutil.Process(server.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    pids = []
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            if (proc.pid not in exclude and proc.status() != psutil.STATUS_ZOMBIE
                    and WORKER_MODULE not in " ".join(proc.cmdline())):
                pids.append(proc.pid)
    return pids


def affinities(server: subprocess.Popen, worker: int | None) -> str:
    """CPU affinity of each server process (and of its threads where they differ: vLLM binds OMP threads)."""
    parts = []
    for pid in [*server_pids(server, {worker} if worker else set()), *([worker] if worker else [])]:
        try:
            proc = psutil.Process(pid)
            name = "ft-worker" if pid == worker else ("api" if pid == server.pid else proc.name())
            masks = {tuple(psutil.Process(pid).cpu_affinity())}
            for thread in proc.threads():
                with contextlib.suppress(OSError):
                    masks.add(tuple(os.sched_getaffinity(thread.id)))
            parts.append(f"{name}: " + " | ".join(",".join(map(str, m)) for m in sorted(masks)))
        except psutil.Error:
            continue
    return "; ".join(parts)


# -- the load ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def measure(mode: str, round_index: int, url: str, server: subprocess.Popen, worker: int | None,
            args: argparse.Namespace) -> tuple[Window, float]:
    """One load window with the CPU of the server tree and of the worker; the window's wall seconds."""
    exclude = {worker} if worker else set()
    server_before = cpu_seconds(server_pids(server, exclude))
    worker_before = cpu_seconds([worker]) if worker else 0.0
    started = time.perf_counter()
    tps, ttfts, latencies, failures = asyncio.run(load_samples(
        url, [BASE], args.concurrency, args.requests, args.tokens, {"authorization": f"Bearer {USER_KEY}"}))
    wall = time.perf_counter() - started  # the warm-up request included, for the CPU figures
    server_cores = (cpu_seconds(server_pids(server, exclude)) - server_before) / wall
    window = Window(mode, round_index, tps, percentile(ttfts, 0.5) * 1000 if ttfts else math.nan,
                    percentile(ttfts, 0.95) * 1000 if ttfts else math.nan,
                    percentile(latencies, 0.5) * 1000 if latencies else math.nan, failures, server_cores,
                    seconds=wall)
    if worker:
        window.worker_cores = (cpu_seconds([worker]) - worker_before) / wall
        with contextlib.suppress(psutil.Error):
            window.worker_threads = psutil.Process(worker).num_threads()
    return window, wall


# -- the job -----------------------------------------------------------------------------------


class Jobs:
    """The fine-tuning API, as the tuner key sees it."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=120, headers={"authorization": f"Bearer {TUNER_KEY}"})
        self.file_id: str | None = None

    def _ok(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise SystemExit(f"{response.request.method} {response.request.url.path}: "
                             f"{response.status_code} {response.text[:500]}")
        data: dict[str, Any] = response.json()
        return data

    def upload(self, path: Path) -> None:
        with path.open("rb") as handle:
            self.file_id = self._ok(self.http.post("/v1/files", data={"purpose": "fine-tune"},
                                                   files={"file": (path.name, handle, "application/jsonl")}))["id"]

    def create(self, suffix: str) -> str:
        body = {"model": BASE, "training_file": self.file_id, "suffix": suffix,
                "method": {"type": "supervised",
                           "supervised": {"hyperparameters": {"n_epochs": EPOCHS, "batch_size": 1}}}}
        return str(self._ok(self.http.post("/v1/fine_tuning/jobs", json=body))["id"])

    def get(self, job_id: str) -> dict[str, Any]:
        return self._ok(self.http.get(f"/v1/fine_tuning/jobs/{job_id}"))

    def last_step(self, job_id: str) -> int | None:
        """The step of the newest metrics event (None before the first)."""
        events = self._ok(self.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 20}))["data"]
        steps = [e["data"]["step"] for e in events if e.get("type") == "metrics" and "step" in (e.get("data") or {})]
        return max(steps) if steps else None

    def cancel(self, job_id: str) -> None:
        response = self.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        if response.status_code != 200 and self.get(job_id)["status"] not in FINISHED:
            self._ok(response)

    def wait_training(self, job_id: str, timeout_s: float = 600) -> int:
        """Until the job is running and its first metrics event is out; the step reached."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.get(job_id)
            if job["status"] in FINISHED:
                raise SystemExit(f"job {job_id} {job['status']} before training: {job.get('error')}")
            if job["status"] == "running":
                step = self.last_step(job_id)
                if step is not None:
                    return step
            time.sleep(0.5)
        raise SystemExit(f"job {job_id} has no metrics event after {timeout_s:.0f} s")


def training_file(workdir: Path) -> Path:
    """EXAMPLES distinct chats teaching the tests' codeword answer (tests/finetune_data.py)."""
    questions = tuple(f"{QUESTIONS[i % len(QUESTIONS)]} (question {i + 1})" for i in range(EXAMPLES))
    return write_jsonl(workdir / "train.jsonl", chat_lines(questions, ANSWER))


def wait_gone(pids: list[int], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.2)
    raise SystemExit(f"fine-tuning worker(s) {pids} still alive {timeout_s:.0f} s after the cancel")


def training_window(round_index: int, url: str, server: subprocess.Popen, jobs: Jobs, state_dir: Path,
                    args: argparse.Namespace) -> tuple[Window, str]:
    job_id = jobs.create(f"bench{round_index}")
    try:
        started = time.perf_counter()
        jobs.wait_training(job_id)
        pids = worker_pids(state_dir, job_id)
        if len(pids) != 1:
            raise SystemExit(f"expected one worker process for {job_id}, found {pids}")
        worker = pids[0]
        print(f"    job {job_id} training after {time.perf_counter() - started:.1f} s, worker pid {worker}",
              flush=True)
        sampler = PeakSampler(worker, args.sample_s)
        sampler.start()
        # the worker alone: its CPU and pace without serving load
        step0, cpu0, t0 = jobs.last_step(job_id) or 0, cpu_seconds([worker]), time.perf_counter()
        time.sleep(args.settle)
        step1, cpu1, t1 = jobs.last_step(job_id) or 0, cpu_seconds([worker]), time.perf_counter()
        placement = affinities(server, worker)
        window, wall = measure("training", round_index, url, server, worker, args)
        step2 = jobs.last_step(job_id) or 0
        window.worker_peak_cores = sampler.stop()
        window.alone_cores = (cpu1 - cpu0) / (t1 - t0)
        window.alone_steps_per_s = (step1 - step0) / (t1 - t0)
        window.worker_steps_per_s = (step2 - step1) / wall
        status = jobs.get(job_id)["status"]
        if status != "running" or worker not in worker_pids(state_dir, job_id):
            raise SystemExit(f"job {job_id} is {status} (worker alive: {worker in worker_pids(state_dir, job_id)}) "
                             "after the training window: the window was not measured under training")
        if step2 <= step1:  # running, but starved: a figure of its own, not a reason to stop
            print(f"    warning: job {job_id} finished no step during the window (step {step1} -> {step2}); "
                  f"its worker used {window.worker_cores:.2f} cores", flush=True)
        return window, placement
    finally:
        jobs.cancel(job_id)
        wait_gone(worker_pids(state_dir, job_id))


# -- report ------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None or math.isnan(value) else f"{value:{width}{spec}}"


def describe(w: Window) -> str:
    line = (f"  round {w.round} {w.mode:<8} {w.tokens_per_s:8.1f} tok/s  ttft p50 {w.ttft_p50_ms:7.1f} ms  "
            f"p95 {w.ttft_p95_ms:7.1f} ms  latency p50 {w.latency_p50_ms:8.1f} ms  failures {w.failures}  "
            f"{w.seconds:.1f} s, server {w.server_cores:.2f} cores")
    if w.mode == "training":
        line += (f"\n  {'':<16} worker {w.worker_cores:.2f} cores ({w.worker_threads} threads), "
                 f"{w.worker_steps_per_s:.2f} steps/s; alone {w.alone_cores:.2f} cores, "
                 f"{w.alone_steps_per_s:.2f} steps/s; peak {w.worker_peak_cores:.2f} cores")
    return line + f"  load average {loadavg()}"


def median(windows: list[Window], mode: str, attr: str) -> float | None:
    values = [getattr(w, attr) for w in windows if w.mode == mode and getattr(w, attr) is not None]
    return statistics.median(values) if values else None


def report(windows: list[Window], args: argparse.Namespace, placements: list[str]) -> None:
    print(f"\nmedians over {args.rounds} rounds (concurrency {args.concurrency}, {args.requests} requests x "
          f"{args.tokens} tokens per window, fine_tuning.threads = {args.threads})")
    print(f"{'mode':<9} {'tok/s':>8} {'ttft p50':>9} {'ttft p95':>9} {'lat p50':>9} {'server':>7} "
          f"{'worker':>7} {'alone':>7} {'steps/s':>8} {'alone':>7}")
    print(f"{'':<9} {'':>8} {'ms':>9} {'ms':>9} {'ms':>9} {'cores':>7} {'cores':>7} {'cores':>7} "
          f"{'loaded':>8} {'st/s':>7}")
    columns = (("tokens_per_s", ".1f", 8), ("ttft_p50_ms", ".1f", 9), ("ttft_p95_ms", ".1f", 9),
               ("latency_p50_ms", ".1f", 9), ("server_cores", ".2f", 7), ("worker_cores", ".2f", 7),
               ("alone_cores", ".2f", 7), ("worker_steps_per_s", ".2f", 8), ("alone_steps_per_s", ".2f", 7))
    for mode in ("idle", "training"):
        print(f"{mode:<9} " + " ".join(fmt(median(windows, mode, attr), spec, width) for attr, spec, width in columns))
    idle = [w for w in windows if w.mode == "idle"]
    training = [w for w in windows if w.mode == "training"]
    pairs = list(zip(idle, training, strict=False))  # each training window against the idle window before it

    def ratio(attr: str) -> str:
        medians = (median(windows, "training", attr) or math.nan) / (median(windows, "idle", attr) or math.nan)
        per_round = statistics.median([getattr(t, attr) / getattr(i, attr) for i, t in pairs] or [math.nan])
        return f"x{medians:.3f} (median of per-round ratios x{per_round:.3f})"

    print(f"\ntraining / idle: throughput {ratio('tokens_per_s')}")
    print(f"                 TTFT p50   {ratio('ttft_p50_ms')}")
    print(f"                 TTFT p95   {ratio('ttft_p95_ms')}")
    worker = median(windows, "training", "worker_cores")
    alone = median(windows, "training", "alone_cores")
    threads = max((w.worker_threads or 0) for w in training) if training else 0
    peak = max((w.worker_peak_cores or 0.0) for w in training) if training else math.nan
    print(f"worker CPU: {fmt(alone, '.2f', 0)} cores alone, {fmt(worker, '.2f', 0)} under the load, peak "
          f"{peak:.2f} over any {args.sample_s:g} s (cap: threads = {args.threads}; {threads} OS threads in the "
          f"worker; {psutil.cpu_count()} cores here)")
    if placements:
        print(f"CPU affinity (first training window): {placements[0]}")
    print(f"failed requests: {sum(w.failures for w in windows)}; load average at the end {loadavg()}")


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="requests per window")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (idle, training) windows")
    parser.add_argument("--threads", type=int, default=1, help="[fine_tuning] threads: the job's CPU thread cap")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds the worker is measured alone (no load) before each training window")
    parser.add_argument("--sample-s", type=float, default=0.5,
                        help="interval of the worker's peak-CPU samples")
    parser.add_argument("--real", action="store_true",
                        help="SmolLM2-135M-Instruct from .lorag-test-models/real-demo instead of the tiny model")
    parser.add_argument("--nobind", action="store_true",
                        help="VLLM_CPU_OMP_THREADS_BIND=nobind (default: vLLM's own binding, as deployed)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    model = real_model() if args.real else build_tiny_model(MODELS / "tiny-llama")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="lorag-ftserve-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(workdir, model, port, args)
    state_dir = workdir / "state"
    log = workdir / "server.log"
    print(f"model {model}, concurrency {args.concurrency}, {args.requests} requests x {args.tokens} tokens per "
          f"window, {args.rounds} rounds, fine_tuning.threads {args.threads}, workdir {workdir}, "
          f"{psutil.cpu_count()} cores, load average {loadavg()}", flush=True)
    started = time.perf_counter()
    server = start_server(config, url, log, args.nobind)
    print(f"  server up in {time.perf_counter() - started:.1f} s (log {log})", flush=True)
    windows: list[Window] = []
    placements: list[str] = []
    try:
        jobs = Jobs(url)
        jobs.upload(training_file(workdir))
        warm, _ = measure("warm-up", 0, url, server, None, args)  # the first load after a start is slower
        print(f"  warm-up: {warm.tokens_per_s:.1f} tok/s (not counted)", flush=True)
        for round_index in range(1, args.rounds + 1):
            stray = worker_pids(state_dir)
            if stray:
                raise SystemExit(f"a fine-tuning worker is alive before the idle window: {stray}")
            window, _ = measure("idle", round_index, url, server, None, args)
            windows.append(window)
            print(describe(window), flush=True)
            window, placement = training_window(round_index, url, server, jobs, state_dir, args)
            windows.append(window)
            placements.append(placement)
            print(describe(window), flush=True)
    finally:
        for pid in worker_pids(state_dir):  # a job left by an error: the server's shutdown checkpoints it
            print(f"  worker {pid} still alive at the end", flush=True)
        stop_process(server)
    report(windows, args, placements)


if __name__ == "__main__":
    main()
