"""Look at a model source before converting it: what it is, whether it is whole, how big.

Why a separate, cheap pass: conversion takes a minute and writes hundreds of
megabytes. Everything that can be known from headers (a GGUF's magic and tensor
table, an HF folder's config, weights and tokenizer files) is checked first, so a
bad source fails in a second with one line and nothing written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lorag.models.errors import CorruptModelFile, MissingTokenizer, ModelSourceNotFound
from lorag.models.files import sha256_file

GGUF_MAGIC = b"GGUF"
# Any one of these is a tokenizer transformers can load (tokenizer_config.json alone is not).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt",
                   "tekken.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING")


@dataclass
class SourceInfo:
    """What the probe learned about a source; enough to name it, size it and check it."""

    kind: Literal["gguf", "hf"]
    path: Path
    parameters: int
    license: str | None = None
    architectures: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def default_name(self) -> str:
        return sanitize_name(self.path.stem if self.kind == "gguf" else self.path.name)


def sanitize_name(text: str) -> str:
    """A model name from a file or folder name: lower case, [a-z0-9._-], no leading dot."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return name[:100] or "model"


def probe_source(source: Path) -> SourceInfo:
    """Classify and validate `source` (a GGUF file or an HF model folder) without loading weights."""
    if not source.exists():
        raise ModelSourceNotFound(f"{source}: no such file or folder")
    if source.is_dir():
        return probe_hf_folder(source)
    try:
        with source.open("rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise CorruptModelFile(f"{source}: cannot read it: {err.strerror or err}") from None
    if magic == GGUF_MAGIC:
        return probe_gguf(source)
    if source.suffix.lower() == ".gguf":
        raise CorruptModelFile(f"{source}: not a GGUF file (the GGUF magic bytes are missing)")
    raise CorruptModelFile(f"{source}: neither a GGUF file nor a Hugging Face model folder")


# -- GGUF -----------------------------------------------------------------------


def probe_gguf(path: Path) -> SourceInfo:
    """Parse the header and tensor table; a file cut short or garbled is refused here."""
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
        tensors = list(reader.tensors)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    except Exception as err:
        raise CorruptModelFile(f"{path}: corrupt or truncated GGUF file ({_reason(err)})") from None
    if not tensors:
        raise CorruptModelFile(f"{path}: corrupt GGUF file (it holds no tensors)")
    if end > size:
        raise CorruptModelFile(f"{path}: truncated GGUF file ({size} bytes, its tensors need {end})")
    metadata = {key: _field_value(reader, key) for key in (
        "general.architecture", "general.name", "general.license", "general.organization",
        "tokenizer.ggml.model")}
    if not metadata["tokenizer.ggml.model"]:
        raise MissingTokenizer(f"{path}: the GGUF file holds no tokenizer (tokenizer.ggml.model is missing)")
    if not metadata["general.architecture"]:
        raise CorruptModelFile(f"{path}: corrupt GGUF file (general.architecture is missing)")
    return SourceInfo(
        kind="gguf",
        path=path.resolve(),
        parameters=sum(int(t.n_elements) for t in tensors),
        license=metadata["general.license"] or None,
        metadata={k: v for k, v in metadata.items() if v},
    )


def _field_value(reader: Any, key: str) -> str | None:
    found = reader.fields.get(key)
    if found is None:
        return None
    try:
        value = found.contents()
    except Exception:
        return None
    return str(value) if value is not None else None


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# -- Hugging Face folder ----------------------------------------------------------


def probe_hf_folder(folder: Path) -> SourceInfo:
    """config.json, weights and a tokenizer must all be there; parameters come from the headers."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CorruptModelFile(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise CorruptModelFile(f"{config_file}: unreadable config ({_reason(err)})") from None
    weights = weight_files(folder)
    if not weights:
        raise CorruptModelFile(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")
    if not has_tokenizer(folder):
        raise MissingTokenizer(f"{folder}: no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    architectures = config.get("architectures") or []
    return SourceInfo(
        kind="hf",
        path=folder.resolve(),
        parameters=sum(_count_parameters(f) for f in weights),
        license=folder_license(folder, config),
        architectures=[a for a in architectures if isinstance(a, str)],
        metadata={"model_type": config.get("model_type")},
    )


def weight_files(folder: Path) -> list[Path]:
    """Safetensors when present (what transformers loads first), else PyTorch .bin shards."""
    for pattern in WEIGHT_PATTERNS:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if found:
            return found
    return []


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def weights_digest(folder: Path) -> str:
    """One sha256 over the weight files (name and hash of each), so two imports can be compared."""
    digest = hashlib.sha256()
    for file in weight_files(folder):
        digest.update(f"{file.name}  {sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _count_parameters(file: Path) -> int:
    """Elements in a safetensors file from its JSON header; a .bin is guessed from its size."""
    if file.suffix != ".safetensors":
        return file.stat().st_size // 2  # an over-estimate for float32 shards: fine for a space check
    try:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 << 20:
                raise ValueError("header too large")
            header = json.loads(handle.read(length))
        return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise CorruptModelFile(f"{file}: corrupt safetensors file ({_reason(err)})") from None


def folder_license(folder: Path, config: dict[str, Any]) -> str | None:
    """The licence as the folder states it: config, the model card's front matter, or a LICENSE file."""
    if isinstance(config.get("license"), str):
        return str(config["license"])
    readme = folder / "README.md"
    if readme.is_file():
        found = _front_matter_license(readme.read_text(encoding="utf-8", errors="replace"))
        if found:
            return found
    for name in LICENSE_FILES:
        if (folder / name).is_file():
            return f"see {name}"
    return None


def _front_matter_license(text: str) -> str | None:
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    import yaml

    try:
        front = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return str(value) if value else None
