"""Batched multi-adapter LoRA ops in plain torch (CPU and CUDA), and their naive reference.

Every token t of a flattened batch has a slot s[t] (-1: base only). For each adapted layer

    y[t] += (x[t] @ A[s[t]].T) @ B[s[t]].T        # A: [slots, r_max, in], B: [slots, out, r_max]

with the LoRA scale folded into B. `LoRAPlan` is computed once per engine step from the
token->slot mapping and read by every layer, so model code never sees it. Two paths:

- short runs (decode tokens) -> one padded `bmm` over the stacked slot buffers [0, hi),
  reading each slot's weights in place (no gather of A/B, which costs more than the math);
- long runs (prefill chunks) -> one pair of matmuls per run;
the split is chosen per step by a cost estimate (`choose_bmm_slots`).

A fused GPU kernel (punica/S-LoRA style) would replace `apply_lora` and keep the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rough CPU costs, in rows of the padded bmm: reading one slot's weights, and the two extra
# matmul calls per layer of a run computed on its own (calibrated on the bench model).
WEIGHT_READ_ROWS = 2
RUN_CALL_ROWS = 16


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


def _runs(slot_of_token: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs (slot, start, end) of equal slots, base-only tokens left out."""
    runs = []
    start, n = 0, len(slot_of_token)
    while start < n:
        slot = slot_of_token[start]
        end = start + 1
        while end < n and slot_of_token[end] == slot:
            end += 1
        if slot >= 0:
            runs.append((slot, start, end))
        start = end
    return runs


def choose_bmm_slots(runs: list[tuple[int, int, int]]) -> set[int]:
    """Slots whose tokens go through the padded bmm; the others' runs get their own matmuls.

    The bmm over slots [0, hi) with `rows` rows each computes hi * rows rows and reads hi
    slots' weights; a run on its own costs two matmul calls per layer plus its rows. We pick the
    row count that minimises the estimate (in row-equivalents): a single 31-token prefill chunk
    among 31 decode tokens must not pad every slot to 31 rows.
    """
    tokens: dict[int, int] = {}
    count: dict[int, int] = {}
    for slot, start, end in runs:
        tokens[slot] = tokens.get(slot, 0) + end - start
        count[slot] = count.get(slot, 0) + 1
    best, best_cost = set(), float("inf")
    for rows in sorted({0, *tokens.values()}):
        chosen = {slot for slot, n in tokens.items() if n <= rows}
        hi = max(chosen) + 1 if chosen else 0
        cost = hi * (rows + WEIGHT_READ_ROWS) + sum(
            count[slot] * (RUN_CALL_ROWS + WEIGHT_READ_ROWS) + tokens[slot]
            for slot in tokens
            if slot not in chosen
        )
        if cost < best_cost:
            best, best_cost = chosen, cost
    return best


def make_plan(
    slot_of_token: list[int], rank_of_slot: list[int] | dict[int, int], device: torch.device
) -> LoRAPlan:
    """Builds the plan from the per-token slot list (host side, once per step)."""
    all_runs = _runs(slot_of_token)
    n = len(slot_of_token)
    rank = max((rank_of_slot[slot] for slot, _, _ in all_runs), default=0)
    in_bmm = choose_bmm_slots(all_runs)
    runs = [run for run in all_runs if run[0] not in in_bmm]
    short = [run for run in all_runs if run[0] in in_bmm]
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
