"""The LoRA backend seam: a plan once per step, an apply per adapted layer.

Every token t of a step's flattened batch has a slot s[t] (-1: base only). For each adapted layer

    y[t] += (x[t] @ A[s[t]]ᵀ) @ B[s[t]]ᵀ        # A: [slots, r_max, in], B: [slots, out, r_max]

with the LoRA scale already folded into B by the slot table. A backend splits that into

- `plan(slot_of_token, rank_of_slot)`: host-side work, once per step (the runner calls it through
  `SlotTable.plan` and puts the result in the step's forward context);
- `apply(y, x, a, b, plan)`: device work, once per adapted layer, reading only the plan, so a
  layer makes no data-dependent Python decision and a step can be captured in a CUDA graph.

Every plan carries `SlotGroups`: the adapted tokens' indices stably sorted by slot, with the
active slots, their counts, offsets and ranks. That is what a gather kernel (punica/S-LoRA/SGMV
style) iterates over; a backend's plan subclass adds its own device tensors built from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class SlotGroups:
    """The adapted tokens of one step grouped by slot (a stable sort by slot; base tokens left out)."""

    slots: tuple[int, ...]  # [G] the slots used this step, ascending
    starts: tuple[int, ...]  # [G] offset of each slot's first token in `order`
    counts: tuple[int, ...]  # [G] tokens of each slot
    ranks: tuple[int, ...]  # [G] rank of each slot (its adapter's highest rank)
    order: tuple[int, ...]  # [N] indices of the tokens that have a slot, by slot, in batch order within one

    @classmethod
    def of(cls, slot_of_token: Sequence[int], rank_of_slot: Sequence[int]) -> SlotGroups:
        adapted = [t for t, slot in enumerate(slot_of_token) if slot >= 0]
        order = sorted(adapted, key=slot_of_token.__getitem__)  # stable: batch order within a slot
        slots: list[int] = []
        starts: list[int] = []
        counts: list[int] = []
        for i, t in enumerate(order):
            slot = slot_of_token[t]
            if not slots or slots[-1] != slot:
                slots.append(slot)
                starts.append(i)
                counts.append(0)
            counts[-1] += 1
        ranks = tuple(rank_of_slot[slot] for slot in slots)
        return cls(tuple(slots), tuple(starts), tuple(counts), ranks, tuple(order))

    @property
    def max_count(self) -> int:
        """Most tokens of one slot (a kernel grid's token-block bound)."""
        return max(self.counts, default=0)


@dataclass(frozen=True)
class LoRAPlan:
    """How one step's tokens meet their slots; backends subclass it with their own layout."""

    num_tokens: int  # T, the rows of x and y
    rank: int  # highest rank among the slots used this step: layers slice A/B to [:, :rank]
    groups: SlotGroups

    @property
    def empty(self) -> bool:
        """True when no token has a slot: applying the plan adds nothing."""
        return not self.groups.slots


class LoRABackend(ABC):
    """Computes the LoRA term of a step's mixed-adapter batch, for one device."""

    name: ClassVar[str]

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abstractmethod
    def plan(self, slot_of_token: Sequence[int], rank_of_slot: Sequence[int]) -> LoRAPlan:
        """Builds the step's plan on the host from each token's slot (-1: none) and each slot's rank."""

    @abstractmethod
    def apply(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: LoRAPlan
    ) -> None:
        """Adds the LoRA term to y in place.

        y: [T, out], x: [T, in], a: [S, r_max, in], b: [S, out, r_max] (slot s's rank-r adapter in
        a[s, :r] and b[s, :, :r], zero past r), plan: this backend's plan for the step's T tokens.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device})"
