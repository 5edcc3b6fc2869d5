"""`lorag demo`: build a tiny local model with a few adapters, serve them, show them side by side.

Everything lives under the state directory, and a second run reuses it. The
model is tiny and randomly initialised: its text is gibberish by design, what
the demo shows is the machinery (per-request adapters, hot-swap, the API).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import click
import httpx

from lorag.config import load_settings

DEMO_ADAPTERS = ("legal", "medical", "support")
DEMO_QUESTION = "Can my landlord keep the deposit?"
REAL_MODEL_HINT = (
    "lorag serve --model Qwen/Qwen2.5-7B-Instruct --adapter legal=/path/to/peft-dir --api-key $KEY\n"
    "  (or set model.path in lorag.toml: a local HF checkpoint directory or an HF id)"
)


def setup_demo(state_dir: Path, port: int) -> Path:
    """Build (or reuse) the demo model and adapters; write and return <state>/lorag.toml."""
    from lorag.devmodel import build_random_adapter, build_tiny_model

    state_dir = state_dir.resolve()
    model = build_tiny_model(state_dir / "models" / "tiny-llama")
    adapter_lines = []
    for seed, name in enumerate(DEMO_ADAPTERS, start=1):
        path = build_random_adapter(model, state_dir / "models" / "adapters" / name, seed=seed)
        adapter_lines.append(f'[adapters.preload.{name}]\npath = "{path}"\n')
    config = state_dir / "lorag.toml"
    config.write_text(f"""# Written by `lorag demo`. To serve a real model, change model.path (see README).
state_dir = "{state_dir}"

[model]
path = "{model}"
name = "demo-base"
max_model_len = 1024

[engine]
max_loras = 2
max_lora_rank = 16
enforce_eager = true

[server]
host = "127.0.0.1"
port = {port}

[adapters]
allowed_roots = ["{state_dir / 'models'}"]

{''.join(adapter_lines)}""")
    return config


def show_samples(url: str) -> None:
    """Ask the base model and each adapter the same question; print how to do it yourself."""
    with httpx.Client(base_url=url, timeout=120) as http:
        click.echo(f"\nSame question, greedy decoding, per model: {DEMO_QUESTION!r}")
        for model in ("demo-base", *DEMO_ADAPTERS):
            body = {"model": model, "messages": [{"role": "user", "content": DEMO_QUESTION}],
                    "max_tokens": 24, "temperature": 0}
            reply = http.post("/v1/chat/completions", json=body).json()
            text = reply["choices"][0]["message"]["content"]
            adapter = reply["lorag"]["adapter"] or "(base model)"
            click.echo(f"  {model:<10} via {adapter:<14} {text!r}")
    click.echo(f"""
The demo model is tiny (2 layers, random weights): the text above is gibberish on purpose.
What it shows is real: one vLLM engine, each request answered by the adapter it names.

Talk to it:
  curl {url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "legal", "messages": [{{"role": "user", "content": "hi"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  client.chat.completions.create(model="medical", messages=[{{"role": "user", "content": "hi"}}])

  lorag chat --server {url} -m support "hello"
  lorag adapters --server {url} list

Serve a real model instead (one line):
  {REAL_MODEL_HINT}

Ctrl-C stops the server.""")


@click.command()
@click.option("--state-dir", default=".lorag", show_default=True, help="Where the demo keeps model, adapters, config.")
@click.option("--port", default=8000, show_default=True)
@click.option("--setup-only", is_flag=True, help="Build the model and adapters and write lorag.toml, then exit.")
@click.option("--exit-after-samples", is_flag=True, help="Stop the server after printing the samples.")
def demo(state_dir: str, port: int, setup_only: bool, exit_after_samples: bool) -> None:
    """Build a tiny model with three adapters, serve it, and show each adapter's answer."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the terminal for the demo itself
    click.echo(f"Setting up the demo under {state_dir} (reused on the next run) ...")
    config = setup_demo(Path(state_dir), port)
    click.echo(f"Wrote {config}")
    if setup_only:
        return
    import uvicorn

    from lorag.runtime.server import create_app

    settings = load_settings(config)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    url = f"http://127.0.0.1:{port}"

    def samples() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.5)
        if server.should_exit:
            return
        try:
            show_samples(url)
        finally:
            if exit_after_samples:
                server.should_exit = True

    click.echo(f"Starting the engine and server on {url} (about 20-30 s on a laptop CPU) ...")
    threading.Thread(target=samples, daemon=True).start()
    server.run()
