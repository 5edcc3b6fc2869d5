"""`import_model`: a GGUF file or an HF folder in, a servable checkpoint out, or nothing.

Why all-or-nothing: a half-written model folder looks like a model until vLLM fails
on it minutes later. The import probes the source first (fast, one-line errors),
checks the disk has room, converts into a hidden staging folder under the models
directory and renames it into place only when complete; any failure, Ctrl-C
included, removes the staging folder.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from lorag import __version__
from lorag.errors import LoragError
from lorag.logging import get_logger
from lorag.models.architectures import check_architectures
from lorag.models.convert import DTYPES, Converted, convert_gguf, convert_hf
from lorag.models.errors import ModelError, ModelExists, NotEnoughDiskSpace
from lorag.models.files import (
    ensure_free_space,
    is_no_space,
    replace_dir,
    set_default_permissions,
    sha256_file,
    staging_dir,
)
from lorag.models.names import NAME_RE
from lorag.models.probe import SourceInfo, probe_source, weights_digest
from lorag.models.record import ModelRecord, write_record

log = get_logger("lorag.models")

BYTES_PER_PARAMETER = {"bfloat16": 2, "float16": 2, "float32": 4}


def import_model(
    source: str | Path,
    models_dir: str | Path,
    name: str | None = None,
    dtype: str = "bfloat16",
    *,
    force: bool = False,
) -> ModelRecord:
    """Import `source` as `models_dir/NAME` and return its record; refuses an existing NAME unless `force`."""
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    models_root = Path(models_dir).expanduser().resolve()
    info = probe_source(Path(source).expanduser())
    name = name or info.default_name
    if not NAME_RE.match(name):
        raise ModelError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (starting with a letter or digit)")
    target = models_root / name
    if target.exists() and not force:
        raise ModelExists(f"a model named {name} is already imported ({target}); pass --force to replace it")
    if info.kind == "hf":
        check_architectures(info.architectures, str(info.path))  # before any loading: a second, not a minute
    needed = info.parameters * BYTES_PER_PARAMETER[dtype]
    ensure_free_space(models_root, needed, f"importing {name}")
    log.info("model_import_started", name=name, source=str(info.path), kind=info.kind, dtype=dtype,
             parameters=info.parameters)
    try:
        with staging_dir(models_root, name) as staging:
            record = _convert_into(staging, info, name, dtype, target)
            set_default_permissions(staging)
            replace_dir(staging, target)
    except LoragError:
        raise
    except Exception as err:  # transformers, torch, safetensors: any failure is one line, staging gone
        if is_no_space(err):
            raise NotEnoughDiskSpace(f"ran out of disk space importing {name} under {models_root}") from None
        raise ModelError(f"importing {info.path} failed: {_one_line(err)}") from err
    log.info("model_imported", name=name, path=str(target), architecture=record.architecture,
             parameters=record.parameters)
    return record


def _convert_into(staging: Path, info: SourceInfo, name: str, dtype: str, target: Path) -> ModelRecord:
    """Convert, then write the provenance record last: its presence marks a finished import."""
    converted: Converted
    if info.kind == "gguf":
        source_sha256 = sha256_file(info.path)
        converted = convert_gguf(info.path, staging, dtype)
    else:
        source_sha256 = weights_digest(info.path)
        converted = convert_hf(info.path, staging, dtype, info.architectures)
    record = ModelRecord(
        name=name,
        path=str(target),
        source=str(info.path),
        source_kind=info.kind,
        source_sha256=source_sha256,
        license=info.license,
        parameters=converted.parameters,
        dtype=dtype,
        architecture=converted.architecture,
        imported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        lorag_version=__version__,
        chat_template=converted.chat_template,
        extra=dict(info.metadata),
    )
    write_record(staging, record)
    return record


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
