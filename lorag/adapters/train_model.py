"""The model a training run fine-tunes: tokenizer, precision, the (4-bit) base with LoRA layers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorag.adapters.train_settings import ALL_LINEAR, TrainSettings
from lorag.errors import LoragError
from lorag.logging import get_logger

log = get_logger("lorag.adapters.train")

def load_tokenizer(settings: TrainSettings) -> Any:
    from transformers import AutoTokenizer

    source = settings.tokenizer_path or settings.model_path
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise LoragError(f"Cannot load the tokenizer of {source}: {err}") from None


def amp_dtype_for(precision: str, device: Any) -> Any:
    """Mixed precision only where it pays and works: CUDA (bf16 where supported, else fp16)."""
    import torch

    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise LoragError(f"--precision {precision} needs a CUDA GPU; on CPU training runs in fp32.")
        return None
    if precision == "fp32":
        return None
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise LoragError("This GPU does not support bf16; use --precision fp16 or auto.")
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def build_model(settings: TrainSettings, device: Any, amp_dtype: Any) -> tuple[Any, list[str]]:
    """The base model (4-bit with --qlora) wrapped with a fresh LoRA adapter, or the init adapter
    (trainable) when the settings name one; returns it and its target modules."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": amp_dtype or torch.float32, "trust_remote_code": settings.trust_remote_code}
    if settings.qlora:
        kwargs.update(_qlora_kwargs(device, amp_dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(settings.model_path, **kwargs)
    except (OSError, ValueError) as err:
        raise LoragError(f"Cannot load the base model {settings.model_path}: {err}") from None
    if not settings.qlora:
        model.to(device)
    model.config.use_cache = False
    if settings.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(settings.seed)  # the LoRA A matrices' initialisation
    if settings.init_adapter:
        return _load_adapter(model, settings.init_adapter)
    targets = resolve_target_modules(model, settings.target_modules)
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), targets


def _load_adapter(base: Any, directory: str) -> tuple[Any, list[str]]:
    """`base` with the LoRA adapter in `directory`, trainable, as its own config describes it."""
    from peft import PeftModel

    if not (Path(directory).expanduser() / "adapter_config.json").is_file():
        raise LoragError(f"--init-adapter {directory} is not a PEFT adapter directory (no adapter_config.json).")
    try:
        model = PeftModel.from_pretrained(base, str(Path(directory).expanduser()), is_trainable=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise LoragError(f"Cannot load the adapter {directory} onto the base model: {err}") from None
    config: Any = model.peft_config["default"]
    if getattr(config, "peft_type", None) != "LORA":
        raise LoragError(f"--init-adapter {directory} is a {config.peft_type} adapter; only LoRA can be trained.")
    targets = config.target_modules
    return model, sorted(targets) if isinstance(targets, (set, list, tuple)) else [str(targets)]


def adapter_rank(model: Any) -> int:
    """The largest LoRA rank of the model's adapter (its rank_pattern included)."""
    config: Any = model.peft_config["default"]
    return max([int(config.r), *(int(r) for r in (config.rank_pattern or {}).values())])


def _qlora_kwargs(device: Any, amp_dtype: Any) -> dict[str, Any]:
    import torch

    if device.type != "cuda":
        raise LoragError("--qlora needs a CUDA GPU and none is available; train a plain LoRA adapter without --qlora.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoragError("--qlora needs bitsandbytes, which is not installed: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=amp_dtype or torch.float32,
    )
    return {"quantization_config": quantization, "device_map": {"": device.index or 0}}


def resolve_target_modules(model: Any, requested: tuple[str, ...]) -> list[str]:
    """Leaf names of the linear layers to adapt ('all-linear': all but the output head).

    Leaf names, not peft's full module paths: the registry and the engine match adapters
    to the model by leaf name (q_proj, ...).
    """
    import torch

    head = model.get_output_embeddings()
    linear = sorted({
        name.rsplit(".", 1)[-1] for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and name
    })
    if tuple(requested) == (ALL_LINEAR,):
        return linear
    unknown = sorted(set(requested) - set(linear))
    if unknown:
        raise LoragError(
            f"Target modules {', '.join(unknown)} are not linear layers of this model "
            f"(it has: {', '.join(linear)}; or use {ALL_LINEAR})."
        )
    return sorted(set(requested))


def pad_id_of(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def linear_schedule(warmup_ratio: float, total_steps: int) -> Callable[[int], float]:
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor
