"""The `reference` LoRA backend: the naive per-token loop that every other backend is tested against.

Too slow to serve (one pair of vector-matrix products per token and layer); it is kept obvious on
purpose, and it ignores `rank` and the grouping, so it checks them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraserve.adapters.lora_backends.base import LoRABackend, LoRAPlan, SlotGroups


@dataclass(frozen=True)
class ReferencePlan(LoRAPlan):
    slot_of_token: tuple[int, ...]  # [T] each token's slot, -1: base only


def lora_reference(x: torch.Tensor, slots: Sequence[int], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The LoRA term [T, out] (not added to anything): x[t] @ A[s]ᵀ @ B[s]ᵀ for each token's slot s.

    x: [T, in], a: [S, r_max, in], b: [S, out, r_max]. Slots past a rank are zero, so the full r_max
    is used.
    """
    out = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
    for t, slot in enumerate(slots):
        if slot >= 0:
            out[t] = (x[t] @ a[slot].T) @ b[slot].T
    return out


class ReferenceBackend(LoRABackend):
    """One token at a time, over the whole r_max."""

    name = "reference"

    def plan(self, slot_of_token: Sequence[int], rank_of_slot: Sequence[int]) -> ReferencePlan:
        groups = SlotGroups.of(slot_of_token, rank_of_slot)
        return ReferencePlan(len(slot_of_token), max(groups.ranks, default=0), groups, tuple(slot_of_token))

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: LoRAPlan
    ) -> None:
        assert isinstance(plan, ReferencePlan), f"the reference backend cannot apply a {type(plan).__name__}"
        y += lora_reference(x, plan.slot_of_token, a, b)
