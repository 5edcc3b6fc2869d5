"""vLLM's own OpenAI servers for the fleet tests and benchmark: the tiny model, loopback, LoRA on,
runtime adapter loading allowed (what docs/scale.md asks of a production server)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.devserver import kill_tree, stop_process, wait_until_up


@dataclass
class VllmServer:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    args: list[str]
    env: dict[str, str]

    def kill(self) -> None:
        """kill -9: no goodbye, as a crashed or preempted replica."""
        kill_tree(self.process)

    def restart(self, timeout_s: float = 300) -> None:
        """The same server again, on the same port, with nothing loaded (as after a crash)."""
        self.kill()
        self.process = subprocess.Popen(self.args, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
                                        env=self.env, start_new_session=True)
        wait_until_up(self.process, self.url, self.log_path, probe="/health", timeout_s=timeout_s)

    def stop(self) -> None:
        stop_process(self.process)
        kill_tree(self.process)  # the engine core, should it outlive its API server


def vllm_server_args(model: Path, served_name: str, port: int, max_loras: int, max_lora_rank: int,
                     max_model_len: int = 512) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank),
        "--max-cpu-loras", str(max(2 * max_loras, 8)), "--max-model-len", str(max_model_len),
        "--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20),
        "--disable-log-stats", "--uvicorn-log-level", "warning",
    ]


def start_vllm_servers(model: Path, served_name: str, workdir: Path, ports: list[int], *, max_loras: int,
                       max_lora_rank: int, timeout_s: float = 300) -> list[VllmServer]:
    """Start them together (their start-ups overlap), then wait for each /health."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_LOGGING_LEVEL": "WARNING",
           "OMP_NUM_THREADS": "1"}
    servers = []
    for port in ports:
        args = vllm_server_args(model, served_name, port, max_loras, max_lora_rank)
        log_path = workdir / f"vllm-{port}.log"
        process = subprocess.Popen(args, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        servers.append(VllmServer(f"http://127.0.0.1:{port}", port, process, log_path, args, env))
    try:
        for server in servers:
            wait_until_up(server.process, server.url, server.log_path, probe="/health", timeout_s=timeout_s)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
