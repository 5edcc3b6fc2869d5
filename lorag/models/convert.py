"""The heavy part of an import: load with transformers, write a plain HF checkpoint.

Why transformers: it reads every GGUF quantization and every HF layout, and what
it saves (config.json with `architectures`, safetensors, tokenizer files with the
chat template) is exactly what vLLM loads. torch and transformers are imported
here only, so `lorag models list` stays instant.
"""

from __future__ import annotations

import functools
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorag.logging import get_logger, stage
from lorag.models.architectures import check_architectures
from lorag.models.errors import UnsupportedArchitecture
from lorag.models.probe import LICENSE_FILES

log = get_logger("lorag.models")

DTYPES = ("bfloat16", "float16", "float32")
# Small files worth keeping beside the weights: the model card and its licence terms.
KEPT_FILES = ("README.md", *LICENSE_FILES)


@dataclass
class Converted:
    """What the conversion produced, for the provenance record."""

    architecture: str
    parameters: int
    chat_template: bool


def _quiet_transformers() -> None:
    """Keep transformers' warnings off the terminal; progress bars only where a person watches."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def convert_gguf(path: Path, out: Path, dtype: str) -> Converted:
    """Dequantize a GGUF file into `out` as a plain safetensors checkpoint plus its tokenizer."""
    _quiet_transformers()
    with _gguf_parsed_once():
        return _convert_gguf(path, out, dtype)


def _convert_gguf(path: Path, out: Path, dtype: str) -> Converted:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(path.parent), path.name
    with stage(log, "model_config_read", source=str(path)):
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=filename)
        except ValueError as err:
            if "not supported" in str(err):  # transformers' words for a GGUF architecture it cannot map
                raise UnsupportedArchitecture(f"{path}: {str(err).splitlines()[0]}") from None
            raise
    architecture = check_architectures(config.architectures or [_causal_lm_class(config)], str(path))
    with stage(log, "model_dequantized", source=str(path), dtype=dtype):
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, config=config, dtype=_torch_dtype(dtype), **_dequantize_kwargs(filename))
    with stage(log, "model_weights_saved", parameters=model.num_parameters()):
        plain = _plain_copy(model, architecture)
        plain.save_pretrained(out, safe_serialization=True)
    with stage(log, "model_tokenizer_saved"):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        max_len = getattr(config, "max_position_embeddings", None)
        if max_len and (tokenizer.model_max_length or 0) > max_len:
            tokenizer.model_max_length = max_len
        tokenizer.save_pretrained(out)
    return Converted(architecture, int(plain.num_parameters()), bool(tokenizer.chat_template))


def convert_hf(folder: Path, out: Path, dtype: str, architectures: list[str]) -> Converted:
    """Load an HF folder and save it in `dtype` as safetensors with its tokenizer (and card, licence)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    architecture = check_architectures(architectures, str(folder))
    with stage(log, "model_loaded", source=str(folder), dtype=dtype):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=_torch_dtype(dtype))
    model.config.architectures = list(architectures)
    with stage(log, "model_weights_saved", parameters=model.num_parameters()):
        model.save_pretrained(out, safe_serialization=True)
    with stage(log, "model_tokenizer_saved"):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        tokenizer.save_pretrained(out)
    for name in KEPT_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
    return Converted(architecture, int(model.num_parameters()), bool(tokenizer.chat_template))


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Parse the GGUF file once per conversion instead of four times.

    transformers opens a new gguf.GGUFReader for the config, the weights and the tokenizer,
    and rebuilds gguf's tensor-name map for every tensor: on SmolLM2-135M that was ~20 s of a
    45 s import (the reader makes numpy views of each of the 49k vocabulary strings). Both
    are pure functions of their arguments, and transformers imports them from `gguf` at call
    time, so caching them for the conversion's duration changes nothing but the time.
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(reader)  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map  # type: ignore[misc]


def _dequantize_kwargs(filename: str) -> dict[str, Any]:
    """transformers 5 keeps GGUF blocks packed unless told to dequantize; 4.x always dequantizes."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=filename, dequantize=True)}


def _causal_lm_class(config: Any) -> str:
    """The transformers causal-LM class for a config without `architectures` (GGUF gives none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if not name:
        raise UnsupportedArchitecture(f"model type {config.model_type!r} has no causal-LM class in transformers")
    return str(name)


def _plain_copy(model: Any, architecture: str) -> Any:
    """The same weights in a model that was never quantized: transformers refuses to save a GGUF-loaded one.

    Built on the meta device and filled by assignment, so no memory or time goes into a
    random initialisation; it exists only to be saved.
    """
    import torch

    data = model.config.to_dict()
    data.pop("quantization_config", None)
    data["architectures"] = [architecture]
    config = type(model.config).from_dict(data)
    state = model.state_dict()
    with torch.device("meta"):
        plain = type(model)(config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or any(key not in tied for key in missing):
        raise RuntimeError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain
