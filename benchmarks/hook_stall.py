"""Does a slow plugin on one domain stall another domain's streams? (issue 25)

The real app (`create_app`) over real HTTP, on the echo engine (tests/echo_engine.py: generation
costs nothing, so any silence is lorag's own). Domain `fast` streams --streams answers one after
the other, a delta every 5 ms (about 0.5 s each); once each is under way, one request to domain
`checked` is sent too, whose answer passes a third-party validator that takes --sleep seconds. For each of
`fast`'s streams: the longest silence between two chunks. Two runs in this one process: the
baseline `no-validator` (the same `checked` requests, their validator off) and `slow-validator`.

    .venv/bin/python benchmarks/hook_stall.py [--sleep 1.5] [--streams 20]

Prints the median and the worst longest-silence of each run, and their ratios to the baseline.
Before issue 25 a 1.5 s validator left the other domain's streams silent 4.6 s (0.08 s without it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.echo_engine import EchoEngine  # noqa: E402
from tests.echo_server import USER_KEY, echo_server, echo_settings  # noqa: E402

STEP_S = 0.005
ANSWER = "x" * 300  # 100 deltas of 3 characters: about 0.5 s of streaming


def longest_silence(url: str, on_first_chunk: Callable[[], None]) -> float:
    """The longest wait between two chunks of one `fast` stream; `on_first_chunk` runs as it begins."""
    body = {"model": "fast", "messages": [{"role": "user", "content": ANSWER}], "stream": True}
    gaps, last = [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600,
                      headers={"authorization": f"Bearer {USER_KEY}"}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                now = time.perf_counter()
                if last is None:
                    on_first_chunk()
                else:
                    gaps.append(now - last)
                last = now
    return max(gaps)


def run(validator: bool, args: argparse.Namespace, workdir: Path) -> list[float]:
    checked = {"enabled": ["slow_validator"], "settings": {"slow_validator": {"seconds": args.sleep}},
               "hook_timeout_s": args.sleep * 10} if validator else {"enabled": []}
    settings = echo_settings(workdir, domains={"checked": {}, "fast": {}}, plugins={
        "modules": {"slow_validator": "tests.plugins.slow_validator"}, "domains": {"checked": checked}})
    silences = []
    with echo_server(settings, EchoEngine(step_s=STEP_S)) as server, \
            httpx.Client(timeout=600, headers={"authorization": f"Bearer {USER_KEY}"}) as http:
        for _ in range(args.streams):
            other = threading.Thread(target=http.post, args=(f"{server.api}/chat/completions",), kwargs={
                "json": {"model": "checked", "messages": [{"role": "user", "content": "check"}]}})
            # Once the stream is under way: the other domain's answer, and its validator, land mid-stream.
            silences.append(longest_silence(server.url, other.start))
            other.join(600)
    return silences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sleep", type=float, default=1.5, help="seconds the validator takes per answer")
    parser.add_argument("--streams", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(name == "slow-validator", args, Path(tmp) / name)
                   for name in ("no-validator", "slow-validator")}
    base = statistics.median(results["no-validator"])
    print(f"longest silence between chunks of `fast` streams ({args.streams} each, beside a `checked` request "
          f"whose validator takes {args.sleep:g} s)")
    for name, gaps in results.items():
        median, worst = statistics.median(gaps), max(gaps)
        print(f"  {name:15} median {median * 1000:8.1f} ms  worst {worst * 1000:8.1f} ms  "
              f"median vs no-validator {median / base:6.2f}x")


if __name__ == "__main__":
    main()
