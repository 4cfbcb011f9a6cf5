"""Pluggable LoRA backends: how a step's mixed-adapter batch gets its LoRA term.

`select_lora_backend(name, device)` picks one when the slot table is attached (`--lora-backend`):

- `torch`: padded bmm for decode tokens, a matmul pair per prefill run, split by a cost model;
- `triton`: two fused grouped Triton kernels (shrink, expand-and-add) on CUDA, or on CPU tensors
  under Triton's interpreter (TRITON_INTERPRET=1, for tests);
- `reference`: the naive per-token loop, for tests;
- `auto`: `triton` on a CUDA device where triton imports, `torch` otherwise.
"""

from __future__ import annotations

import torch

from loraserve.adapters.lora_backends.base import LoRABackend, LoRAPlan, SlotGroups
from loraserve.adapters.lora_backends.reference import ReferenceBackend, lora_reference
from loraserve.adapters.lora_backends.torch_backend import TorchBackend, TorchPlan
from loraserve.adapters.lora_backends.triton_backend import TritonBackend, TritonPlan, triton_unavailable

__all__ = [
    "BACKENDS",
    "LoRABackend",
    "LoRAPlan",
    "ReferenceBackend",
    "SlotGroups",
    "TorchBackend",
    "TorchPlan",
    "TritonBackend",
    "TritonPlan",
    "lora_reference",
    "select_lora_backend",
    "triton_unavailable",
]

BACKENDS: dict[str, type[LoRABackend]] = {cls.name: cls for cls in (TorchBackend, ReferenceBackend)}


def select_lora_backend(name: str, device: torch.device) -> LoRABackend:
    """The backend called `name` (or `auto`) for `device`; ValueError for one that cannot run here."""
    if name == "auto":
        if device.type == "cuda" and triton_unavailable(device) is None:
            return TritonBackend(device)
        return TorchBackend(device)
    if name == "triton":
        reason = triton_unavailable(device)
        if reason is not None:
            raise ValueError(f"the triton LoRA backend cannot run here: {reason}")
        return TritonBackend(device)
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; expected auto, triton, {', '.join(BACKENDS)}")
    return BACKENDS[name](device)
