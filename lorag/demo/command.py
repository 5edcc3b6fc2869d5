"""`lorag demo`: four domains on a real instruct model, trained, filled and served in minutes.

The set-up (lorag.demo.setup) imports SmolLM2-135M-Instruct, trains two domain
adapters, ingests two knowledge bases and writes lorag.toml; then the server starts and
sample exchanges are printed side by side (lorag.demo.samples_real, or
lorag.demo.samples for `--tiny`, the 2-layer toy that starts in seconds).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import click

from lorag.config import load_settings
from lorag.demo.setup import REAL, TINY, setup_demo, shown


@click.command()
@click.option("--state-dir", default=".lorag", show_default=True,
              help="Where the demo keeps model, adapters, knowledge and config.")
@click.option("--port", default=8000, show_default=True)
@click.option("--tiny", is_flag=True,
              help="A 2-layer random model instead of SmolLM2-135M-Instruct: seconds to set up, memorises, cannot read.")
@click.option("--setup-only", is_flag=True, help="Build model, adapters, knowledge and lorag.toml, then exit.")
@click.option("--exit-after-samples", is_flag=True, help="Stop the server after printing the samples.")
def demo(state_dir: str, port: int, tiny: bool, setup_only: bool, exit_after_samples: bool) -> None:
    """Import a real model, train two domain adapters, add knowledge, serve four domains, show them."""
    from lorag.logging import LOG_LEVEL_ENV, configure_logging

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep the terminal for the demo itself
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # and for the engine's processes
    warnings.filterwarnings("ignore", module=r"pydantic\._internal")  # a dependency's schema warning
    configure_logging(level=os.environ.get(LOG_LEVEL_ENV, "warning"))
    kind = TINY if tiny else REAL
    click.echo(f"Setting up the {'tiny ' if tiny else ''}demo under {state_dir} (reused on the next run) ...")
    config = setup_demo(Path(state_dir), port, kind)
    if setup_only:
        return
    import uvicorn

    from lorag.server.app import create_app
    from lorag.server.listen import bind_listener

    settings = load_settings(config)
    listener = bind_listener("127.0.0.1", port)  # the port is ours before the engine's long start
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    url = f"http://127.0.0.1:{port}"
    failed: list[BaseException] = []

    def samples() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.5)
        if server.should_exit:
            return
        try:
            if tiny:
                from lorag.demo.samples import print_samples
            else:
                from lorag.demo.samples_real import print_samples
            print_samples(url, Path(shown(config)))
        except Exception as err:  # reported after the server stops, as the command's error
            if server.should_exit:  # Ctrl-C stopped the server under the samples: not their failure
                return
            failed.append(err)
            server.should_exit = True
        finally:
            if exit_after_samples:
                server.should_exit = True

    click.echo(f"Starting the engine and server on {url} ({'20-60 s' if tiny else '30-90 s'} on a laptop CPU) ...")
    threading.Thread(target=samples, daemon=True).start()
    server.run(sockets=[listener])
    if failed:
        raise click.ClickException(f"the samples failed: {failed[0]}")
