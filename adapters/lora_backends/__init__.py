"""Pluggable LoRA backends: how a step's mixed-adapter batch gets its LoRA term.

`select_lora_backend(name, device)` picks one when the slot table is attached (`--lora-backend`):

- `torch`: padded bmm for decode tokens, a matmul pair per prefill run, split by a cost model;
- `reference`: the naive per-token loop, for tests;
- `auto`: the best available on the device (today `torch`; a fused Triton kernel on CUDA is the
  planned next backend, behind the same `plan` / `apply` seam of `base.LoRABackend`).
"""

from __future__ import annotations

import torch

from loraserve.adapters.lora_backends.base import LoRABackend, LoRAPlan, SlotGroups
from loraserve.adapters.lora_backends.reference import ReferenceBackend, lora_reference
from loraserve.adapters.lora_backends.torch_backend import TorchBackend, TorchPlan

__all__ = [
    "BACKENDS",
    "LoRABackend",
    "LoRAPlan",
    "ReferenceBackend",
    "SlotGroups",
    "TorchBackend",
    "TorchPlan",
    "lora_reference",
    "select_lora_backend",
]

BACKENDS: dict[str, type[LoRABackend]] = {cls.name: cls for cls in (TorchBackend, ReferenceBackend)}


def select_lora_backend(name: str, device: torch.device) -> LoRABackend:
    """The backend called `name` (or `auto`) for `device`; ValueError for one that cannot run here."""
    if name == "auto":
        return TorchBackend(device)
    if name == "triton":
        raise ValueError("the triton LoRA backend is not available yet; use auto or torch")
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; expected auto, {', '.join(BACKENDS)}")
    return BACKENDS[name](device)
