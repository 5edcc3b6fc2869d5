"""Check a PEFT LoRA directory before the engine ever sees it.

vLLM reports a bad adapter late (at the first request that uses it) and in
engine terms; these checks refuse it at registration with a message that says
what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lorag.errors import LoragError
from lorag.paths import inside_roots

WEIGHT_FILE = "adapter_model.safetensors"
# LoRA parts vLLM cannot serve: extra trainable copies of whole modules, DoRA magnitudes.
UNSUPPORTED_KEYS = ("modules_to_save",)


class AdapterInvalid(LoragError):
    """The adapter directory cannot be served; the message says why."""

    code = "invalid_adapter"


@dataclass(frozen=True)
class AdapterInfo:
    """What the registry keeps about a validated adapter."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str


def check_inside_roots(path: Path, roots: list[Path]) -> Path:
    """Resolve symlinks and `..`, then require the directory, and the files read from it, under `roots`."""
    resolved = inside_roots(path, roots)
    if resolved is not None and all(
        inside_roots(resolved / item, roots) for item in ("adapter_config.json", WEIGHT_FILE)
    ):
        return resolved
    allowed = ", ".join(str(r) for r in roots) or "(none configured)"
    raise AdapterInvalid(
        f"Adapter path {path} is outside the allowed adapter roots ({allowed}); "
        "add its directory to adapters.allowed_roots."
    )


def validate_adapter(
    path: Path,
    *,
    served_model: str,
    model_module_names: set[str],
    max_lora_rank: int,
) -> AdapterInfo:
    """Validate a PEFT LoRA directory against the served model and engine limits."""
    if not path.is_dir():
        raise AdapterInvalid(f"Adapter path {path} is not a directory.")
    config = _read_config(path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterInvalid(f"{path} is a {peft_type or 'unknown'} adapter; lorag serves LoRA adapters only.")
    for key in UNSUPPORTED_KEYS:
        if config.get(key):
            raise AdapterInvalid(
                f"{path}: '{key}' is set ({config[key]}); the engine cannot serve fully trained "
                "module copies. Retrain without it."
            )
    if config.get("use_dora"):
        raise AdapterInvalid(f"{path}: DoRA adapters are not supported by the engine.")
    base = str(config.get("base_model_name_or_path") or "")
    if base and not same_model(base, served_model):
        raise AdapterInvalid(
            f"{path} was trained on '{base}', but this server serves '{served_model}'."
        )
    rank = _positive_int(config.get("r"), "r", path)
    if rank > max_lora_rank:
        raise AdapterInvalid(
            f"{path} has rank {rank}, above the engine's max_lora_rank {max_lora_rank}; "
            "raise engine.max_lora_rank or use a smaller rank."
        )
    targets = _target_modules(config, path)
    unknown = sorted(t for t in targets if t not in model_module_names)
    if unknown and model_module_names:
        raise AdapterInvalid(
            f"{path} targets modules the model does not have: {', '.join(unknown)} "
            f"(the model has: {', '.join(sorted(model_module_names))})."
        )
    _check_weights(path, targets, rank)
    return AdapterInfo(
        rank=rank,
        alpha=float(config.get("lora_alpha") or rank),
        target_modules=tuple(sorted(targets)),
        base_model=base,
    )


def same_model(a: str, b: str) -> bool:
    """Equal as HF ids, or as paths naming the same directory."""
    if a.rstrip("/") == b.rstrip("/"):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return False


def _read_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterInvalid(f"{path} has no adapter_config.json; is it a PEFT adapter directory?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterInvalid(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{config_file} must hold a JSON object.")
    return config


def _positive_int(value: object, key: str, path: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterInvalid(f"{path}: adapter_config.json '{key}' must be a positive integer, got {value!r}.")
    return value


def _target_modules(config: dict, path: Path) -> set[str]:
    raw = config.get("target_modules")
    if isinstance(raw, str):
        raise AdapterInvalid(
            f"{path}: target_modules is a regular expression ({raw!r}); list the module names instead."
        )
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        raise AdapterInvalid(f"{path}: adapter_config.json 'target_modules' must be a non-empty list of names.")
    return set(raw)


def _check_weights(path: Path, targets: set[str], rank: int) -> None:
    """Open the safetensors file, and check every tensor is a LoRA A/B of a target with the rank."""
    from safetensors import safe_open

    weights = path / WEIGHT_FILE
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterInvalid(
                f"{path} has only adapter_model.bin (a pickle); save it with safe_serialization=True."
            )
        raise AdapterInvalid(f"{path} has no {WEIGHT_FILE}.")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
    except Exception as err:  # safetensors raises several types for corrupt files
        raise AdapterInvalid(f"{weights} cannot be read: {err}") from None
    if not keys:
        raise AdapterInvalid(f"{weights} holds no tensors.")
    for key, shape in shapes.items():
        if ".lora_A." in key:
            ok = len(shape) == 2 and shape[0] == rank
        elif ".lora_B." in key:
            ok = len(shape) == 2 and shape[1] == rank
        else:
            raise AdapterInvalid(f"{weights}: tensor '{key}' is not a LoRA A/B weight.")
        if not ok:
            raise AdapterInvalid(f"{weights}: tensor '{key}' has shape {shape}, which does not match rank {rank}.")
        module = key.split(".lora_")[0].rsplit(".", 1)[-1]
        if module not in targets:
            raise AdapterInvalid(f"{weights}: tensor '{key}' is for '{module}', not a listed target module.")


def model_module_names(model_path: str) -> set[str]:
    """Leaf module names of the served model's linear weights (q_proj, ...), from its checkpoint index.

    Empty when the model is an HF id not on disk: the engine then checks targets itself.
    """
    root = Path(model_path).expanduser()
    if not root.is_dir():
        return set()
    names: set[str] = set()
    index = root / "model.safetensors.index.json"
    if index.is_file():
        keys = list(json.loads(index.read_text())["weight_map"])
    else:
        from safetensors import safe_open

        keys = []
        for shard in root.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as handle:
                keys.extend(handle.keys())
    for key in keys:
        if key.endswith(".weight"):
            parts = key[: -len(".weight")].split(".")
            names.add(parts[-1])
    return names
