"""How many device slots the engine allocates: a count, or `auto` from a memory budget.

Sized like the KV cache: a byte budget (`adapter_memory_bytes`, else `adapter_memory_fraction`
of the memory free when the engine starts) divided by what one slot costs. One slot holds, per
adapted module, A `[r_max, in]` and B `[out, r_max]` in the compute dtype, so a slot of rank 8 on
q/v of a small model is a few hundred KiB and hundreds fit where eight used to be configured.
The slots are taken before the KV cache is sized, which then gets its fraction of what is left.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# `auto` never allocates more slots than this: past it the host tier and prefetch serve the tail.
MAX_AUTO_SLOTS = 1024


def bytes_per_slot(shapes: Mapping[str, tuple[int, int]], max_rank: int, dtype: torch.dtype) -> int:
    """Bytes of one slot's A and B over the modules `shapes` (name -> (in, out)) at rank max_rank."""
    element = torch.tensor([], dtype=dtype).element_size()
    return sum(max_rank * (n_in + n_out) for n_in, n_out in shapes.values()) * element


def slot_count(requested: int | str, per_slot: int, budget_bytes: int) -> int:
    """The slots to allocate: `requested` when it is a number, else as many as the budget holds
    (at least 1, at most MAX_AUTO_SLOTS)."""
    if requested != "auto":
        return int(requested)
    return max(1, min(MAX_AUTO_SLOTS, budget_bytes // max(per_slot, 1)))
