"""Random LoRA adapters for tests and benchmarks: distinct, repeatable behaviours on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path


def build_random_adapter(
    model_path: str | Path,
    out_path: str | Path,
    *,
    seed: int,
    rank: int = 8,
    alpha: int = 16,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    scale: float = 1.0,
) -> Path:
    """Write a PEFT LoRA adapter with random (non-zero) A and B: a distinct, repeatable behaviour."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out_path)
    if (out / "adapter_config.json").exists():
        return out
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    model.save_pretrained(str(out), safe_serialization=True)
    _set_base_model(out, str(model_path))
    return out


def _set_base_model(adapter_dir: Path, base: str) -> None:
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config, indent=2))
