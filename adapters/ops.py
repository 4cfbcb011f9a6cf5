"""Batched multi-adapter LoRA ops in plain torch (CPU and CUDA), and their naive reference.

Every token t of a flattened batch has a slot s[t] (-1: base only). For each adapted layer

    y[t] += (x[t] @ A[s[t]].T) @ B[s[t]].T        # A: [slots, r_max, in], B: [slots, out, r_max]

with the LoRA scale folded into B. `LoRAPlan` is computed once per engine step from the
token->slot mapping and read by every layer, so model code never sees it. Two paths:

- long runs of one slot (prefill chunks) -> one pair of matmuls per run;
- short runs (decode tokens) -> one padded `bmm` over the stacked slot buffers [0, hi),
  reading each slot's weights in place (no gather of A/B, which costs more than the math).

A fused GPU kernel (punica/S-LoRA style) would replace `apply_lora` and keep the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Runs of at least this many tokens use their own matmuls rather than the padded bmm.
LONG_RUN_TOKENS = 32


@dataclass(frozen=True)
class LoRAPlan:
    """How one step's tokens meet their slots. Tokens of one slot should be contiguous."""

    num_tokens: int
    rank: int  # highest rank among slots used this step (slices r_max)
    runs: tuple[tuple[int, int, int], ...]  # long runs: (slot, start, end)
    bmm_slots: int  # short runs: slots [0, bmm_slots) ...
    bmm_rows: int  # ... each padded to this many rows
    bmm_src: torch.Tensor | None  # [n] token index of each short-run token
    bmm_dst: torch.Tensor | None  # [n] its row in the padded [bmm_slots * bmm_rows] layout
    bmm_offset: int  # when not None: short-run tokens are x[offset : offset + slots*rows] in order

    @property
    def empty(self) -> bool:
        return not self.runs and self.bmm_slots == 0


def make_plan(
    slot_of_token: list[int],
    rank_of_slot: list[int] | dict[int, int],
    device: torch.device,
    long_run_tokens: int = LONG_RUN_TOKENS,
) -> LoRAPlan:
    """Builds the plan from the per-token slot list (host side, once per step)."""
    runs: list[tuple[int, int, int]] = []
    short: list[tuple[int, int, int]] = []
    start = 0
    n = len(slot_of_token)
    while start < n:
        slot = slot_of_token[start]
        end = start + 1
        while end < n and slot_of_token[end] == slot:
            end += 1
        if slot >= 0:
            (runs if end - start >= long_run_tokens else short).append((slot, start, end))
        start = end
    used = {slot for slot, _, _ in runs} | {slot for slot, _, _ in short}
    rank = max((rank_of_slot[s] for s in used), default=0)
    if not short:
        return LoRAPlan(n, rank, tuple(runs), 0, 0, None, None, -1)

    # Short runs of one slot may be split (other slots' tokens in between): count per slot.
    rows_of: dict[int, int] = {}
    for slot, s, e in short:
        rows_of[slot] = rows_of.get(slot, 0) + (e - s)
    bmm_slots = max(rows_of) + 1
    bmm_rows = max(rows_of.values())
    src: list[int] = []
    dst: list[int] = []
    filled: dict[int, int] = {}
    for slot, s, e in short:
        for t in range(s, e):
            row = filled.get(slot, 0)
            filled[slot] = row + 1
            src.append(t)
            dst.append(slot * bmm_rows + row)
    # Fast path: the short tokens already sit in x exactly in the padded layout.
    offset = src[0] - dst[0]
    contiguous = len(src) == bmm_slots * bmm_rows and all(t - d == offset for t, d in zip(src, dst))
    if contiguous:
        return LoRAPlan(n, rank, tuple(runs), bmm_slots, bmm_rows, None, None, offset)
    return LoRAPlan(
        n,
        rank,
        tuple(runs),
        bmm_slots,
        bmm_rows,
        torch.tensor(src, dtype=torch.long, device=device),
        torch.tensor(dst, dtype=torch.long, device=device),
        -1,
    )


def apply_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: LoRAPlan) -> None:
    """Adds the LoRA term to y in place.

    y: [T, out], x: [T, in], a: [S, r_max, in], b: [S, out, r_max].
    """
    r = plan.rank
    for slot, start, end in plan.runs:
        h = x[start:end] @ a[slot, :r].T  # [n, r]
        y[start:end].addmm_(h, b[slot, :, :r].T)  # [n, out]
    if plan.bmm_slots == 0:
        return
    slots, rows = plan.bmm_slots, plan.bmm_rows
    if plan.bmm_offset >= 0:
        xp = x[plan.bmm_offset : plan.bmm_offset + slots * rows].view(slots, rows, -1)
    else:
        xp = x.new_zeros(slots * rows, x.shape[1])
        xp.index_copy_(0, plan.bmm_dst, x.index_select(0, plan.bmm_src))
        xp = xp.view(slots, rows, -1)  # [S', rows, in]
    h = torch.bmm(xp, a[:slots, :r].transpose(1, 2))  # [S', rows, r]
    d = torch.bmm(h, b[:slots, :, :r].transpose(1, 2))  # [S', rows, out]
    d = d.view(slots * rows, -1)
    if plan.bmm_offset >= 0:
        y[plan.bmm_offset : plan.bmm_offset + slots * rows] += d
    else:
        y.index_add_(0, plan.bmm_src, d.index_select(0, plan.bmm_dst))


def lora_reference(x: torch.Tensor, slots: list[int], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Naive per-token loop, for tests: returns the LoRA term [T, out] (not added to anything)."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
    for t, slot in enumerate(slots):
        if slot >= 0:
            out[t] = (x[t] @ a[slot].T) @ b[slot].T
    return out
