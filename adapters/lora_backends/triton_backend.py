"""The `triton` LoRA backend: two fused grouped kernels (shrink, expand-and-add) per adapted layer.

`plan` (once per step, on the host) groups the step's adapted tokens by slot (`SlotGroups`) and
moves that grouping to the device in one copy: per group its slot, start, count and rank
(`meta`, [4, G] int32) and the tokens sorted by slot (`order`, [N] int32). `apply` (once per layer)
launches `triton_kernels.lora_shrink` then `lora_expand` with grids sized from the plan alone, so
a layer makes no data-dependent Python decision (see triton_kernels for the kernels themselves).

It runs on CUDA, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, which must be
set before triton is first imported): that is how CI tests it. Triton itself is imported only when
the backend is built, so the rest of loraserve never pays for it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraserve.adapters.lora_backends.base import LoRABackend, LoRAPlan, SlotGroups


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unavailable(device: torch.device | None = None) -> str | None:
    """Why the triton backend cannot run on `device` (None: on this machine's CUDA device), or None.

    It can where triton imports and either the device is CUDA (and one exists) or Triton's CPU
    interpreter was asked for with TRITON_INTERPRET=1.
    """
    try:
        importlib.import_module("triton")
    except ImportError as error:  # not installed, or a broken install
        return f"triton does not import ({error}); install it or use --lora-backend torch"
    if _interpret_requested():
        return None
    if device is not None and device.type != "cuda":
        return (
            f"it needs a CUDA device, and the model is on {device} "
            "(TRITON_INTERPRET=1 runs it in Triton's CPU interpreter, for tests)"
        )
    if not torch.cuda.is_available():
        return (
            "it needs a CUDA device and none is available "
            "(TRITON_INTERPRET=1 runs it in Triton's CPU interpreter, for tests)"
        )
    return None


@dataclass(frozen=True)
class TritonPlan(LoRAPlan):
    """The step's grouping on the device, as the kernels read it."""

    meta: torch.Tensor  # [4, G] int32: rows slot, start (in order), count, rank of each group
    order: torch.Tensor  # [N] int32 adapted token indices, sorted by slot (stable)
    num_groups: int  # G
    max_count: int  # tokens of the largest group: the grid's token-block bound


class TritonBackend(LoRABackend):
    """Grouped shrink + expand Triton kernels (punica / S-LoRA / SGLang chunked-SGMV structure)."""

    name = "triton"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        # Imported here, not at module import: triton is optional and decides at its own import
        # whether kernels are compiled or interpreted.
        from loraserve.adapters.lora_backends import triton_kernels

        self._kernels = triton_kernels

    def plan(self, slot_of_token: Sequence[int], rank_of_slot: Sequence[int]) -> TritonPlan:
        groups = SlotGroups.of(slot_of_token, rank_of_slot)
        num_groups = len(groups.slots)
        # One host->device copy per step: [slots | starts | counts | ranks | order].
        packed = [*groups.slots, *groups.starts, *groups.counts, *groups.ranks, *groups.order]
        host = torch.tensor(packed, dtype=torch.int32)
        if self.device.type == "cuda":
            device_tensor = host.pin_memory().to(self.device, non_blocking=True)
        else:
            device_tensor = host.to(self.device)
        meta = device_tensor[: 4 * num_groups].view(4, num_groups)
        order = device_tensor[4 * num_groups :]
        rank = max(groups.ranks, default=0)
        return TritonPlan(len(slot_of_token), rank, groups, meta, order, num_groups, groups.max_count)

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: LoRAPlan
    ) -> None:
        """y: [T, out] += LoRA term; x: [T, in], a: [S, r_max, in], b: [S, out, r_max] (any strides)."""
        assert isinstance(plan, TritonPlan), f"the triton backend cannot apply a {type(plan).__name__}"
        if plan.num_groups == 0:  # a step-level fact of the plan, the same for every layer
            return
        k = self._kernels
        split = k.shrink_split_k(plan.max_count, x.shape[1])  # from shapes and the plan, not data
        h = torch.empty(split, plan.order.shape[0], max(plan.rank, 1), dtype=torch.float32, device=x.device)
        k.lora_shrink(x, a, h, plan.meta, plan.order, plan.num_groups, plan.max_count, plan.rank)
        k.lora_expand(h, b, y, plan.meta, plan.order, plan.num_groups, plan.max_count)
