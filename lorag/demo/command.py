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
from collections.abc import Callable
from pathlib import Path

import click

from lorag.config import load_settings
from lorag.demo.setup import REAL, TINY, DemoKind, setup_demo, shown

STATE_DIR = click.option("--state-dir", default=".lorag", show_default=True,
                         help="Where the demo keeps model, adapters, knowledge and config.")
PORT = click.option("--port", default=8000, show_default=True)


@click.group(invoke_without_command=True)
@STATE_DIR
@PORT
@click.option("--tiny", is_flag=True,
              help="A 2-layer random model instead of SmolLM2-135M-Instruct: seconds to set up, memorises, cannot read.")
@click.option("--setup-only", is_flag=True, help="Build model, adapters, knowledge and lorag.toml, then exit.")
@click.option("--exit-after-samples", is_flag=True, help="Stop the server after printing the samples.")
@click.pass_context
def demo(ctx: click.Context, state_dir: str, port: int, tiny: bool, setup_only: bool,
         exit_after_samples: bool) -> None:
    """Import a real model, train two domain adapters, add knowledge, serve four domains, show them.

    `lorag demo loop` then runs one round of the loop from serving back to training.
    """
    if ctx.invoked_subcommand is not None:
        return
    kind = TINY if tiny else REAL
    config = set_up(state_dir, port, kind)
    if setup_only:
        return

    def samples(url: str) -> None:
        if tiny:
            from lorag.demo.samples import print_samples
        else:
            from lorag.demo.samples_real import print_samples
        print_samples(url, Path(shown(config)))
        if not tiny:
            click.echo(f"\nNext: `lorag demo loop --state-dir {state_dir}` runs one round of the loop (store, grade, "
                       "best-of-n pairs, DPO, gated promotion; 10-20 minutes on 2 cores); docs/loop.md.")

    serve_while(config, port, samples, exit_after=exit_after_samples, engine_wait="20-60 s" if tiny else "30-90 s")


@demo.command("loop")
@STATE_DIR
@PORT
def loop(state_dir: str, port: int) -> None:
    """One round of the loop on the legal domain: store, grade, best-of-n pairs, DPO, gate, before/after."""
    from lorag.demo.loop import run_round

    config = set_up(state_dir, port, REAL)
    serve_while(config, port, run_round, exit_after=True, engine_wait="30-90 s")


def set_up(state_dir: str, port: int, kind: DemoKind) -> Path:
    from lorag.logging import LOG_LEVEL_ENV, configure_logging

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep the terminal for the demo itself
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # and for the engine's processes
    warnings.filterwarnings("ignore", module=r"pydantic\._internal")  # a dependency's schema warning
    configure_logging(level=os.environ.get(LOG_LEVEL_ENV, "warning"))
    click.echo(f"Setting up the {'tiny ' if kind is TINY else ''}demo under {state_dir} (reused on the next run) ...")
    return setup_demo(Path(state_dir), port, kind)


def serve_while(config: Path, port: int, work: Callable[[str], object], *, exit_after: bool, engine_wait: str) -> None:
    """Serve `config` in this process; `work(url)` runs in a thread once the server is up. Its failure is
    the command's error (after the server stops); `exit_after` stops the server when it is done."""
    import uvicorn

    from lorag.server.app import create_app
    from lorag.server.listen import bind_listener

    settings = load_settings(config)
    listener = bind_listener("127.0.0.1", port)  # the port is ours before the engine's long start
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    url = f"http://127.0.0.1:{port}"
    failed: list[BaseException] = []

    def run() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.5)
        if server.should_exit:
            return
        try:
            work(url)
        except Exception as err:  # reported after the server stops, as the command's error
            if server.should_exit:  # Ctrl-C stopped the server under the work: not its failure
                return
            failed.append(err)
            server.should_exit = True
        finally:
            if exit_after:
                server.should_exit = True

    click.echo(f"Starting the engine and server on {url} ({engine_wait} on a laptop CPU) ...")
    threading.Thread(target=run, daemon=True).start()
    server.run(sockets=[listener])
    if failed:
        message = failed[0].message if isinstance(failed[0], click.ClickException) else str(failed[0])
        raise click.ClickException(message)
