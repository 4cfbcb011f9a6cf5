"""A training job's own LoRA weights, beside the served base model's adapter slots.

The Training service trains through the very layers that serve: each `LoRALinear` of the
slot table (loraserve.adapters.layer) adds `TrainableLoRA.add` when the forward context of a
training pass carries one, and nothing of it otherwise. The base weights (quantized or not)
stay frozen and shared; no second copy of the model exists. A and B are initialised as PEFT
initialises them (A Kaiming-uniform, B zero), so a job starts from the base model's outputs,
and `peft_files` writes them as a standard PEFT adapter folder's contents.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraserve.errors import InvalidArgument

ALL_LINEAR = "all-linear"


def select_modules(adapted: list[str], spec: str) -> list[str]:
    """The adapted module names (model.layers.0.self_attn.q_proj...) a job trains.

    `spec`: `all-linear` (every module the server adapts) or comma-separated leaf names, each of
    which the server must adapt (else the adapter could not be served)."""
    if not spec.strip() or spec.strip() == ALL_LINEAR:
        return list(adapted)
    leaves = [leaf.strip() for leaf in spec.split(",") if leaf.strip()]
    served = {name.rsplit(".", 1)[-1] for name in adapted}
    if not leaves:
        raise InvalidArgument("options.target_modules names no module (give all-linear or module names)")
    unknown = sorted(set(leaves) - served)
    if unknown:
        named = ", ".join(unknown)
        raise InvalidArgument(
            f"options.target_modules: {named[:200]}{'...' if len(named) > 200 else ''} not adapted by this "
            f"server (it adapts {', '.join(sorted(served))})"
        )
    return [name for name in adapted if name.rsplit(".", 1)[-1] in leaves]


class TrainableLoRA:
    """Trainable A [r, in] and B [out, r] per module; y += scale · (x @ Aᵀ) @ Bᵀ."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        rank: int,
        alpha: float,
        device: torch.device,
        seed: int,
        rslora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        generator = torch.Generator().manual_seed(seed)
        self.a: dict[str, nn.Parameter] = {}
        self.b: dict[str, nn.Parameter] = {}
        for name, (fan_in, fan_out) in shapes.items():
            a = torch.empty(rank, fan_in, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's init of lora_A
            self.a[name] = nn.Parameter(a.to(device=device, dtype=dtype))
            self.b[name] = nn.Parameter(torch.zeros(fan_out, rank, dtype=dtype, device=device))

    def parameters(self) -> list[nn.Parameter]:
        return [p for name in self.a for p in (self.a[name], self.b[name])]

    def add(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [..., in], y: [..., out] the base layer's output -> y plus this module's LoRA term."""
        a = self.a.get(name)
        if a is None:
            return y
        b = self.b[name]
        # The float32 weights are cast to the activations' dtype (gradients still reach them):
        # casting x instead would keep a float32 copy of every input alive for the backward pass.
        delta = (x @ a.to(x.dtype).t()) @ b.to(x.dtype).t()  # [..., out]
        return y + (delta * self.scale).to(y.dtype)

    def peft_files(self, base_model: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """(adapter_config.json contents, adapter_model.safetensors tensors) as PEFT writes them."""
        leaves = sorted({name.rsplit(".", 1)[-1] for name in self.a})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.rslora,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "target_modules": leaves,
            "inference_mode": True,
        }
        tensors = {}
        for name in self.a:
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = self.a[name].detach().float().cpu().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = self.b[name].detach().float().cpu().contiguous()
        return config, tensors
