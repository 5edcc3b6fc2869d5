"""`lorag demo`: four domains on one tiny local model, trained and served in under two minutes.

The set-up does what a team would do by hand, with the same code paths:

1. builds a small base model (lorag.devmodel) whose tokenizer knows the demo's words;
2. trains two LoRA adapters with `lorag adapters train` (legal-lora, medical-lora) on the
   bundled Q&A files in lorag/demo_data/ and registers them;
3. ingests the bundled documents into two knowledge bases (legal-kb, medical-kb);
4. writes lorag.toml with the domain profiles of lorag/demo_data/domains.toml.

Everything lives under the state directory. A second run reuses all of it: the model is
kept, an adapter is trained only if no version with the same data, settings and base
model is registered (the version label is that digest), ingestion skips unchanged documents, and
lorag.toml is rewritten only when it would change.

Then it serves, and prints sample exchanges side by side (lorag.runtime.demo_samples).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from lorag.config import Settings, load_settings
from lorag.runtime.demo_samples import DATA, REAL_MODEL

BASE_NAME = "demo-base"


@dataclass(frozen=True)
class DemoDomain:
    """A domain whose adapter the demo trains and whose knowledge base it fills."""

    name: str
    adapter: str
    kb: str

    @property
    def train_file(self) -> str:
        return f"{self.name}/train.jsonl"

    @property
    def docs(self) -> str:
        return f"{self.name}/knowledge"


TRAINED = (DemoDomain("legal", "legal-lora", "legal-kb"), DemoDomain("medical", "medical-lora", "medical-kb"))
# The tiny model: 2 layers, hidden 128. A wider initialisation than the usual 0.02 lets the
# output head make confident choices, so an adapter can learn ~30 answers in ~40 steps.
MODEL_SHAPE: dict[str, Any] = {"vocab_size": 2048, "hidden_size": 128, "layers": 2, "init_std": 0.08}
# Memorise, fast: every example in one batch, a high learning rate, no dropout, no held-out split.
TRAIN_ARGS = ("--rank", "16", "--lr", "1e-2", "--epochs", "40", "--batch-size", "32", "--dropout", "0",
              "--val-split", "0", "--warmup-ratio", "0", "--seed", "0", "--keep-checkpoints", "1")

Echo = Callable[[str], None]


def shown(path: Path) -> str:
    """A path as the person typed it: relative to the working directory when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- set-up ----------------------------------------------------------------------------


def setup_demo(state_dir: Path, port: int, echo: Echo = click.echo) -> Path:
    """Build (or reuse) model, adapters, knowledge and config; return <state>/lorag.toml."""
    state_dir = state_dir.resolve()
    started = time.perf_counter()
    data = copy_data(state_dir / "demo")
    model = build_model(state_dir / "models" / BASE_NAME, data, echo)
    config = write_config(state_dir, model, port, echo)
    settings = load_settings(config)
    for domain in TRAINED:
        train_adapter(settings, domain, data, echo)
    warn_foreign_adapters(settings, echo)
    ingest_knowledge(settings, data, echo)
    echo(f"Set-up done in {time.perf_counter() - started:.0f} s.")
    return config


def copy_data(target: Path) -> Path:
    """The bundled data, copied under the state dir: stable paths for training runs and citations.

    Only files whose bytes differ are written, so a second run leaves every mtime alone.
    """
    for source in sorted(DATA.rglob("*")):
        if source.is_file() and source.suffix in {".jsonl", ".md", ".txt", ".toml"}:
            dest = target / source.relative_to(DATA)
            if not dest.exists() or dest.read_bytes() != source.read_bytes():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, dest)
    return target


def demo_corpus(data: Path) -> str:
    """The tokenizer's training text: the tiny corpus plus every word the demo uses."""
    from lorag.devmodel import TINY_CORPUS

    texts = [TINY_CORPUS]
    for file in sorted(data.rglob("*")):
        if file.suffix == ".jsonl":
            for line in file.read_text(encoding="utf-8").splitlines():
                record = json.loads(line) if line.strip() else {}
                texts += [m["content"] for m in record.get("messages", [])]
                texts += [str(record[k]) for k in ("question", "answer") if k in record]
        elif file.suffix in {".md", ".txt", ".toml"}:
            texts.append(file.read_text(encoding="utf-8"))
    return "\n".join(texts)


def build_model(path: Path, data: Path, echo: Echo) -> Path:
    from transformers.utils import logging as hf_logging

    from lorag.devmodel import build_tiny_model

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a 2 MB model
    if (path / "config.json").exists():
        echo(f"  base model     reused {shown(path)}")
        return path
    mark = time.perf_counter()
    build_tiny_model(path, corpus=demo_corpus(data), **MODEL_SHAPE)
    echo(f"  base model     built in {time.perf_counter() - mark:.1f} s: {shown(path)} (2 layers, random weights)")
    return path


def write_config(state_dir: Path, model: Path, port: int, echo: Echo) -> Path:
    """lorag.toml: engine and server settings, then the domain profiles of domains.toml."""
    config = state_dir / "lorag.toml"
    text = f"""# Written by `lorag demo`. To serve a real model, change model.path (see the README).
state_dir = {json.dumps(str(state_dir))}

[model]
path = {json.dumps(str(model))}   # e.g. "{REAL_MODEL}" (then retrain the adapters on it)
name = "{BASE_NAME}"
max_model_len = 2048

[engine]
max_loras = 2
max_lora_rank = 16
enforce_eager = true
kv_cache_memory_bytes = 268435456

[server]
host = "127.0.0.1"
port = {port}

[knowledge.chunking]
chunk_size = 96
chunk_overlap = 0

{(state_dir / "demo" / "domains.toml").read_text(encoding="utf-8")}"""
    if config.exists() and config.read_text(encoding="utf-8") == text:
        echo(f"  config         reused {shown(config)}")
    else:
        config.write_text(text, encoding="utf-8")
        echo(f"  config         wrote {shown(config)}")
    return config


def adapter_version(settings: Settings, data_file: Path) -> str:
    """A version label that is a digest of what decides the weights: data, settings, base model."""
    model = Path(settings.model.path)
    digest = hashlib.sha256(data_file.read_bytes())
    digest.update("\0".join(TRAIN_ARGS).encode())
    digest.update((model / "config.json").read_bytes() + (model / "tokenizer.json").read_bytes())
    digest.update(str((model / "model.safetensors").stat().st_size).encode())  # random weights, seeded
    return "d" + digest.hexdigest()[:8]


def train_adapter(settings: Settings, domain: DemoDomain, data: Path, echo: Echo) -> str:
    """Train with `lorag adapters train` (in this process) unless this exact version is registered."""
    import torch

    from lorag.adapters.cli import Target
    from lorag.adapters.registry import AdapterRegistry
    from lorag.adapters.train_cli import train_command
    from lorag.errors import NotFoundError

    train_file = data / domain.train_file
    version = adapter_version(settings, train_file)
    registry = AdapterRegistry(settings.state_path)
    try:
        entry = registry.resolve(f"{domain.adapter}@{version}")
    except NotFoundError:
        entry = None
    if entry is not None and Path(entry.path).is_dir():
        if registry.resolve(domain.adapter).version != version:
            registry.activate(domain.adapter, version)
        echo(f"  adapter        reused {entry.ref} (same data, settings and base model)")
        return entry.ref
    lines = sum(1 for line in train_file.read_text(encoding="utf-8").splitlines() if line.strip())
    echo(f"  adapter        training {domain.adapter} on {lines} examples:\n"
         f"                 lorag adapters train {domain.adapter} {shown(train_file)} {' '.join(TRAIN_ARGS)}")
    target = Target(settings, server=None, api_key=None, offline=True)
    threads = torch.get_num_threads()
    # Matrices this small gain nothing from more threads, and lose a lot on a busy machine
    # (measured on 2 cores: 16 s with one thread, 37-58 s with two).
    torch.set_num_threads(1)
    try:
        train_command.main([domain.adapter, str(train_file), *TRAIN_ARGS, "--version", version],
                           prog_name="lorag adapters train", obj=target, standalone_mode=False)
    finally:
        torch.set_num_threads(threads)
    return f"{domain.adapter}@{version}"


def warn_foreign_adapters(settings: Settings, echo: Echo) -> None:
    """Adapters of another base model in this state dir (an older demo, a real model): the server loads them too."""
    from lorag.adapters.registry import AdapterRegistry

    model = str(Path(settings.model.path).resolve())
    foreign = [e.ref for e in AdapterRegistry(settings.state_path).current() if e.base_model != model]
    if foreign:
        echo(f"  note           {', '.join(foreign)} in this state dir were trained on another base model; if the\n"
             f"                 server cannot load them, remove them (lorag adapters --state-dir {shown(settings.state_path)} "
             "remove NAME) or use a new --state-dir.")


def ingest_knowledge(settings: Settings, data: Path, echo: Echo) -> None:
    """Each trained domain's documents into its knowledge base; unchanged documents are skipped."""
    from lorag.knowledge.service import KnowledgeService

    service = KnowledgeService.from_settings(settings)
    try:
        for domain in TRAINED:
            if not service.exists(domain.kb):
                service.create(domain.kb, description=f"Demo documents of the {domain.name} domain.")
            report = service.ingest_paths(domain.kb, [str(data / domain.docs)], sync=True)
            if report.failed:
                raise click.ClickException(f"ingesting into {domain.kb} failed: {report.to_dict()['skipped']}")
            summary = service.summary(domain.kb)
            what = "unchanged" if not (report.added or report.updated or report.removed) else (
                f"added {len(report.added)}, updated {len(report.updated)}, removed {len(report.removed)}")
            echo(f"  knowledge      {domain.kb}: {summary['documents']} documents, {summary['chunks']} chunks ({what})")
    finally:
        service.close()


# -- samples ---------------------------------------------------------------------------


# -- the command -----------------------------------------------------------------------


@click.command()
@click.option("--state-dir", default=".lorag", show_default=True,
              help="Where the demo keeps model, adapters, knowledge and config.")
@click.option("--port", default=8000, show_default=True)
@click.option("--setup-only", is_flag=True, help="Build model, adapters, knowledge and lorag.toml, then exit.")
@click.option("--exit-after-samples", is_flag=True, help="Stop the server after printing the samples.")
def demo(state_dir: str, port: int, setup_only: bool, exit_after_samples: bool) -> None:
    """Train two domain adapters on a tiny local model, add knowledge, serve four domains, show them."""
    from lorag.logging import LOG_LEVEL_ENV, configure_logging

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep the terminal for the demo itself
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # and for the engine's processes
    warnings.filterwarnings("ignore", module=r"pydantic\._internal")  # a dependency's schema warning
    configure_logging(level=os.environ.get(LOG_LEVEL_ENV, "warning"))
    click.echo(f"Setting up the demo under {state_dir} (reused on the next run) ...")
    config = setup_demo(Path(state_dir), port)
    if setup_only:
        return
    import uvicorn

    from lorag.runtime.server import create_app

    settings = load_settings(config)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    url = f"http://127.0.0.1:{port}"
    failed: list[BaseException] = []

    def samples() -> None:
        from lorag.runtime.demo_samples import print_samples

        while not server.started and not server.should_exit:
            time.sleep(0.5)
        if server.should_exit:
            return
        try:
            print_samples(url, Path(shown(config)))
        except Exception as err:  # reported after the server stops, as the command's error
            failed.append(err)
            server.should_exit = True
        finally:
            if exit_after_samples:
                server.should_exit = True

    click.echo(f"Starting the engine and server on {url} (20-60 s on a laptop CPU) ...")
    threading.Thread(target=samples, daemon=True).start()
    server.run()
    if failed:
        raise click.ClickException(f"the samples failed: {failed[0]}")
