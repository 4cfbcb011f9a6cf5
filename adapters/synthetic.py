"""Random but valid PEFT LoRA adapters for a given base, saved exactly as PEFT saves them.

Used by tests and the benchmark (N adapters of rank r on chosen modules). PEFT itself builds
and saves them, so the folders are standard: adapter_config.json + adapter_model.safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def make_peft_adapter(
    base_model_path: Path | str,
    out_dir: Path | str,
    seed: int,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: list[str] | str | None = None,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layers_to_transform: list[int] | None = None,
    weight_std: float = 0.05,
    base_model: Any = None,
) -> Path:
    """Creates a LoRA adapter with random A and B (B non-zero, so it changes the output)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = base_model or AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules
        or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        layers_to_transform=layers_to_transform,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * weight_std)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir))
    if base_model is not None:
        peft_model.unload()  # leave the caller's base model as it was
    return out_dir
