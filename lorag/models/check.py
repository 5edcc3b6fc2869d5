"""Fail fast: is the configured model something vLLM can start, before vLLM starts?

Why: vLLM reports a missing folder, a GGUF file, an unknown architecture or a
missing tokenizer only after half a minute of start-up and as a long traceback.
These checks read a few small files and answer in a second, with one line that
says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorag.models.architectures import check_architectures
from lorag.models.errors import CorruptModelFile, MissingTokenizer, ModelSourceNotFound
from lorag.models.probe import GGUF_MAGIC, has_tokenizer

if TYPE_CHECKING:
    from lorag.config import ModelSettings


def looks_local(value: str) -> bool:
    """A path a person typed (absolute, ./, ../, ~) or one that exists; anything else may be an HF id."""
    return value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", "..") or Path(value).expanduser().exists()


def check_model(model: ModelSettings) -> Path:
    """The model's local folder, checked; a one-line ModelError naming the problem otherwise."""
    folder = model_folder(model.path)
    config = _read_config(folder, model.path)
    if not (model.trust_remote_code and config.get("auto_map")):  # remote code may bring its own class
        check_architectures(config.get("architectures"), f"model {model.path}")
    _check_tokenizer(model.tokenizer, folder, model.path)
    return folder


def model_folder(value: str) -> Path:
    """A local folder for `value`: the folder itself, or the local HF cache's snapshot of an id."""
    if looks_local(value):
        path = Path(value).expanduser()
        if not path.exists():
            raise ModelSourceNotFound(f"model {value}: no such folder (and no imported model of that name: "
                                      f"see `lorag models list`)")
        if path.is_file():
            if _is_gguf(path):
                raise CorruptModelFile(f"model {value} is a GGUF file, which vLLM does not serve here: "
                                       f"import it first: lorag models import {value}")
            raise CorruptModelFile(f"model {value} is a file; expected a model folder with config.json")
        return path.resolve()
    snapshot = _hf_cache_snapshot(value)
    if snapshot is None:
        raise ModelSourceNotFound(
            f"model {value}: not a local folder, an imported model (`lorag models list`) or a model in the "
            f"local Hugging Face cache; lorag does not download at start-up: run `hf download "
            f"{value}` where there is network, or `lorag models import` a local copy")
    return snapshot


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC or path.suffix.lower() == ".gguf"
    except OSError:
        return path.suffix.lower() == ".gguf"


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub would refuse (spaces, too many slashes) is simply not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def _read_config(folder: Path, value: str) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CorruptModelFile(f"model {value}: no config.json in {folder} (not a Hugging Face model folder)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CorruptModelFile(f"model {value}: unreadable config.json ({err})") from None
    if not isinstance(config, dict):
        raise CorruptModelFile(f"model {value}: config.json is not a JSON object")
    return config


def _check_tokenizer(tokenizer: str | None, folder: Path, value: str) -> None:
    if tokenizer:
        if looks_local(tokenizer) and not Path(tokenizer).expanduser().exists():
            raise MissingTokenizer(f"model.tokenizer {tokenizer}: no such file or folder")
        return
    if not has_tokenizer(folder):
        raise MissingTokenizer(f"model {value}: no tokenizer in {folder} (set model.tokenizer, or add tokenizer.json)")
