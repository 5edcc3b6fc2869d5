"""Stored completions: bytes per stored completion, and chat throughput with `store: true` vs off.

(a) Storage: --records realistic completions written with lorag's own CompletionStore into a
fresh loop database (a domain's system prompt, a ~40-word question, three retrieved passages
of ~80 words in the rendered prompt and as citations, a ~120-word answer; the record's shape is
copied from one the server really stored). Reported: (db file + WAL, after a TRUNCATE
checkpoint) / records, and the JSON size of one record for reference; also the same figure for
the records part (b) stored through the server (no retrieved context there).

(b) Throughput: the real app (`create_app`) over real HTTP on the echo engine
(tests/echo_server.py), served from a child process so the load client does not share its GIL;
every answer is the same ~120-word text. --concurrency clients send non-streamed chat
completions (the base model, a system prompt and a ~40-word question) --per-client times per
round; rounds alternate `store-off` (the baseline) and `store-on` (`store: true` with
metadata), --rounds of each, so machine noise hits both. A round ends with a list call, which
waits for the queued writes: the store's cost is inside the round that made it. The echo
engine is the hardest case for the ratio (no generation time hides the store's cost); the real
engine is not measured here.

    .venv/bin/python benchmarks/stored_completions.py [--records 2000] [--concurrency 16]
        [--per-client 25] [--rounds 6]

Prints requests/s per mode (median over rounds, min and max) and the ratio against store-off,
and the server process's CPU time per request (all its threads, the writer's included: psutil),
which a shared machine's noise moves less than wall time. Target: store-on >= 0.97x store-off.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import multiprocessing
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorag.loop.completions import DAY_S, CompletionStore, StoredCompletion  # noqa: E402
from lorag.loop.database import loop_database  # noqa: E402
from tests.echo_engine import EchoEngine  # noqa: E402
from tests.echo_server import USER_KEY, echo_server, echo_settings  # noqa: E402

VOCABULARY = ("tenant landlord notice period lease month written deposit repair rent agreement clause court "
              "inspection damage return days law party contract signed")
WORDS = VOCABULARY.split()
SYSTEM = "You are the housing-law assistant. Answer from the context; cite sources as [n]; say when unsure."
MODES = ("store-off", "store-on")


def text(words: int, seed: int) -> str:
    """Varied prose of `words` words (varied so that SQLite pages do not compress into repeats)."""
    return " ".join(WORDS[(seed * 7 + i * (seed % 5 + 1)) % len(WORDS)] for i in range(words)).capitalize() + "."


ANSWER = text(120, 3)


class LongAnswers(EchoEngine):
    """Every answer is the same ~120-word text (the echo engine otherwise echoes the question)."""

    def _answer(self, prompt: str, adapter: str | None, params: Any) -> tuple[str, str]:
        return ANSWER, "stop"


def chat_body(seed: int, store: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "echo-base", "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": text(40, seed)}]}
    if store:
        body.update(store=True, metadata={"bench": "stored_completions", "round": str(seed % 7)})
    return body


# -- the server, in a child process --------------------------------------------------


def serve(workdir: str, pipe: Connection) -> None:
    """Run the echo server until the parent says stop; send it the URL first. It logs as `lorag serve`
    does off a terminal (JSON lines, level info), into server.log: the logging is part of the cost."""
    from lorag.logging import configure_logging

    Path(workdir).mkdir(parents=True, exist_ok=True)
    sys.stderr = (Path(workdir) / "server.log").open("w", encoding="utf-8")  # closed with the process
    configure_logging(level="info", fmt="json")
    settings = echo_settings(Path(workdir))
    with echo_server(settings, LongAnswers()) as server:
        pipe.send(server.url)
        pipe.recv()


# -- (b) throughput -------------------------------------------------------------------


Sample = tuple[float, float]  # (requests/s, server CPU ms per request) of one round


def cpu_s(server: psutil.Process) -> float:
    times = server.cpu_times()
    return times.user + times.system


async def one_round(http: httpx.AsyncClient, server: psutil.Process, store: bool, args: argparse.Namespace,
                    base: int) -> Sample:
    """One round, the queued writes included (the closing list call waits for them)."""
    async def client(index: int) -> None:
        for i in range(args.per_client):
            body = chat_body(base + index * args.per_client + i, store)
            (await http.post("/v1/chat/completions", json=body)).raise_for_status()

    requests = args.concurrency * args.per_client
    start, cpu = time.perf_counter(), cpu_s(server)
    await asyncio.gather(*(client(index) for index in range(args.concurrency)))
    (await http.get("/v1/chat/completions", params={"limit": 1})).raise_for_status()
    return requests / (time.perf_counter() - start), (cpu_s(server) - cpu) * 1000 / requests


async def throughput(url: str, pid: int, args: argparse.Namespace) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    """Interleaved rounds of each mode (after one warm-up round of each), and one stored record as a template."""
    results: dict[str, list[Sample]] = {mode: [] for mode in MODES}
    server = psutil.Process(pid)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {USER_KEY}"}, timeout=120,
                                 limits=limits) as http:
        base = 0
        for round_ in range(args.rounds + 1):
            for mode in MODES if round_ % 2 else MODES[::-1]:
                sample = await one_round(http, server, mode == "store-on", args, base)
                base += args.concurrency * args.per_client
                if round_:  # round 0 warms both modes up
                    results[mode].append(sample)
        listed = (await http.get("/v1/chat/completions", params={"limit": 1})).json()
        messages = (await http.get(f"/v1/chat/completions/{listed['data'][0]['id']}/messages")).json()
    return results, {"response": listed["data"][0], "messages": messages["data"]}


# -- (a) storage ----------------------------------------------------------------------


def passages(seed: int) -> list[dict[str, Any]]:
    """Three retrieved passages as citations (as lorag.serving.prompt.citation shapes them)."""
    return [{"index": n, "kb": "housing", "source": f"leases/guide-{(seed + n) % 40}.md", "location": f"§{n + seed % 9}",
             "snippet": text(80, seed + 11 * n), "score": round(0.9 - 0.1 * n, 3)} for n in (1, 2, 3)]


def synthetic(template: dict[str, Any], seed: int, now: int) -> StoredCompletion:
    """A record shaped as the server stores one, with its own question, answer and retrieved context."""
    question, answer, cited = text(40, seed), text(120, seed + 1), passages(seed)
    request_id = uuid.uuid4().hex
    response = copy.deepcopy(template["response"])
    response.pop("metadata", None)
    response.update(id=f"chatcmpl-{request_id}", created=now, model="housing")
    response["choices"][0]["message"]["content"] = answer
    response["lorag"].update(domain="housing", adapter="housing-lora@3", request_id=request_id, citations=cited)
    context = "\n\n".join(f"[{c['index']}] {c['source']}: {c['snippet']}" for c in cited)
    prompt = [{"role": "system", "content": f"{SYSTEM}\n\nContext:\n{context}"}, {"role": "user", "content": question}]
    return StoredCompletion(id=response["id"], owner="key-0123456789ab", created=now, expires_at=now + 30 * DAY_S,
                            model="housing", domain="housing", adapter="housing-lora@3",
                            metadata={"app": "web", "session": uuid.uuid4().hex[:12]},
                            messages=[{"role": "user", "content": question}], response=response,
                            context={"prompt_messages": prompt})


def database_bytes(path: Path) -> tuple[int, int]:
    """(db + WAL bytes after a TRUNCATE checkpoint, completions stored)."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        count = conn.execute("SELECT COUNT(*) FROM completions").fetchone()[0]
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0), count


def storage(template: dict[str, Any], records: int, workdir: Path) -> tuple[float, int]:
    """(bytes per stored completion, JSON bytes of one record) for `records` synthetic completions."""
    db = loop_database(workdir)
    store, now = CompletionStore(db), int(time.time())
    made = [synthetic(template, seed, now) for seed in range(records)]
    for record in made:
        store.add(record)
    db.close()
    size, count = database_bytes(db.path)
    one = made[0]
    record_json = json.dumps({"response": one.to_openai(), "messages": one.messages, "context": one.context},
                             ensure_ascii=False, separators=(",", ":"))
    return size / count, len(record_json.encode())


# -- main -----------------------------------------------------------------------------


def run_server_load(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    """(b) against a server in a child process; it stops (its writes flushed) before this returns."""
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=serve, args=(str(workdir), child))
    process.start()
    try:
        url = parent.recv()
        return asyncio.run(throughput(url, process.pid, args))
    finally:
        parent.send("stop")
        process.join(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000, help="(a) completions stored")
    parser.add_argument("--concurrency", type=int, default=16, help="(b) concurrent clients")
    parser.add_argument("--per-client", type=int, default=25, help="(b) requests per client per round")
    parser.add_argument("--rounds", type=int, default=6, help="(b) rounds of each mode, after a warm-up round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        served_dir = Path(tmp) / "served"
        results, template = run_server_load(args, served_dir)
        served_per_record, served = database_bytes(served_dir / "state" / "loop" / "loop.sqlite3")
        per_record, record_json = storage(template, args.records, Path(tmp) / "synthetic")
    report(args, results, per_record, record_json, served_per_record / served, served)


def report(args: argparse.Namespace, results: dict[str, list[Sample]], per_record: float, record_json: int,
           served_per_record: float, served: int) -> None:
    print(f"(a) storage: {args.records} completions with retrieved context (3 passages), "
          "db + WAL after checkpoint")
    print(f"  bytes per stored completion {per_record:10.0f}   JSON of one record {record_json:8d} bytes")
    print(f"  as stored by the server in (b), no context: {served_per_record:.0f} bytes each ({served} records)")
    print(f"(b) throughput: echo engine, {args.concurrency} clients, {args.concurrency * args.per_client} chat "
          f"completions per round, {args.rounds} rounds per mode, interleaved; medians over rounds")
    base_rate = statistics.median(rate for rate, _ in results["store-off"])
    base_cpu = statistics.median(cpu for _, cpu in results["store-off"])
    for mode, samples in results.items():
        rates, cpus = [rate for rate, _ in samples], [cpu for _, cpu in samples]
        rate, cpu = statistics.median(rates), statistics.median(cpus)
        print(f"  {mode:10} {rate:7.1f} req/s (min {min(rates):6.1f}, max {max(rates):6.1f})  vs store-off "
              f"{rate / base_rate:5.3f}x   server CPU {cpu:5.2f} ms/request  vs store-off {cpu / base_cpu:5.3f}x")
    met = statistics.median(rate for rate, _ in results["store-on"]) >= 0.97 * base_rate
    print(f"  target: store-on >= 0.97x store-off req/s: {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
