"""The `torch` LoRA backend: batched multi-adapter LoRA in plain torch (CPU and CUDA).

Two paths, split per step by a cost estimate (`choose_bmm_slots`):

- short runs (decode tokens) -> one padded `bmm` over the slots they use, either in place over
  the stacked slot buffers' range [lo, hi) (no copy of A/B: best when the used slots are dense),
  or over A/B gathered by slot index (a copy of the used slots' weights: best when they are
  sparse, e.g. one request in slot 700 of 1,024); so the cost grows with the distinct adapters
  of the step, not with the highest slot index;
- long runs (prefill chunks) -> one pair of matmuls per run.

A run is a maximal stretch of consecutive tokens of one slot: the runner orders a step's
sequences so that one slot's tokens are contiguous, but any order is computed correctly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraserve.adapters.lora_backends.base import LoRABackend, LoRAPlan, SlotGroups

# Rough CPU costs, in rows of the padded bmm: reading one slot's weights, and the two extra
# matmul calls per layer of a run computed on its own (calibrated on the bench model).
WEIGHT_READ_ROWS = 2
RUN_CALL_ROWS = 16
# Gathering one slot's A/B for the bmm: one more read and a write of its weights.
GATHER_ROWS = 2 * WEIGHT_READ_ROWS


@dataclass(frozen=True)
class TorchPlan(LoRAPlan):
    """The torch backend's layout of one step: long runs on their own, short runs in one padded bmm."""

    runs: tuple[tuple[int, int, int], ...]  # long runs: (slot, start, end)
    bmm_slots: int  # short runs: this many padded groups ...
    bmm_rows: int  # ... each padded to this many rows
    bmm_src: torch.Tensor | None  # [n] token index of each short-run token (None: see bmm_offset)
    bmm_dst: torch.Tensor | None  # [n] its row in the padded [bmm_slots * bmm_rows] layout
    # >= 0: the short-run tokens are exactly x[offset : offset + slots * rows], already in the padded
    # layout (no gather, no scatter); -1: they go through bmm_src / bmm_dst.
    bmm_offset: int
    # Group g is slot bmm_first + g (the range layout, read in place) when bmm_index is None, else
    # slot bmm_index[g] ([bmm_slots] long, A/B gathered by it).
    bmm_first: int = 0
    bmm_index: torch.Tensor | None = None


def _runs(slot_of_token: Sequence[int]) -> list[tuple[int, int, int]]:
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


def bmm_cost(slots: set[int], rows: int) -> tuple[float, bool]:
    """(estimated cost in row-equivalents, whether to gather) of a padded bmm over `slots`.

    In place over [lo, hi) it computes (hi - lo) * rows rows and reads hi - lo slots' weights;
    gathered it computes and reads only len(slots) of them, plus the copy.
    """
    if not slots:
        return 0.0, False
    span = max(slots) - min(slots) + 1
    in_place = span * (rows + WEIGHT_READ_ROWS)
    gathered = len(slots) * (rows + WEIGHT_READ_ROWS + GATHER_ROWS)
    return (gathered, True) if gathered < in_place else (in_place, False)


def choose_bmm_slots(runs: list[tuple[int, int, int]]) -> set[int]:
    """Slots whose tokens go through the padded bmm; the others' runs get their own matmuls.

    The bmm costs `bmm_cost` (its rows and the weights it reads); a run on its own costs two
    matmul calls per layer plus its rows. We pick the row count that minimises the estimate (in
    row-equivalents): a single 31-token prefill chunk among 31 decode tokens must not pad every
    slot to 31 rows.
    """
    tokens: dict[int, int] = {}
    count: dict[int, int] = {}
    for slot, start, end in runs:
        tokens[slot] = tokens.get(slot, 0) + end - start
        count[slot] = count.get(slot, 0) + 1
    best, best_cost = set(), float("inf")
    for rows in sorted({0, *tokens.values()}):
        chosen = {slot for slot, n in tokens.items() if n <= rows}
        cost = bmm_cost(chosen, rows)[0] + sum(
            count[slot] * (RUN_CALL_ROWS + WEIGHT_READ_ROWS) + tokens[slot]
            for slot in tokens
            if slot not in chosen
        )
        if cost < best_cost:
            best, best_cost = chosen, cost
    return best


class TorchBackend(LoRABackend):
    """Padded bmm for short runs, a matmul pair per long run; the split chosen by a cost model."""

    name = "torch"

    def plan(self, slot_of_token: Sequence[int], rank_of_slot: Sequence[int]) -> TorchPlan:
        groups = SlotGroups.of(slot_of_token, rank_of_slot)
        n, rank = len(slot_of_token), max(groups.ranks, default=0)
        all_runs = _runs(slot_of_token)
        in_bmm = choose_bmm_slots(all_runs)
        runs = tuple(run for run in all_runs if run[0] not in in_bmm)
        short = [run for run in all_runs if run[0] in in_bmm]
        if not short:
            return TorchPlan(n, rank, groups, runs, 0, 0, None, None, -1)

        # Short runs of one slot may be split (other slots' tokens in between): rows per slot.
        rows_of = {slot: count for slot, count in zip(groups.slots, groups.counts) if slot in in_bmm}
        bmm_rows = max(rows_of.values())
        used = sorted(rows_of)
        gather = bmm_cost(set(used), bmm_rows)[1]
        first = used[0]
        group_of = {slot: g for g, slot in enumerate(used)} if gather else {s: s - first for s in used}
        bmm_slots = len(used) if gather else used[-1] - first + 1
        index = torch.tensor(used, dtype=torch.long, device=self.device) if gather else None
        src: list[int] = []
        dst: list[int] = []
        filled: dict[int, int] = {}
        for slot, s, e in short:
            for t in range(s, e):
                row = filled.get(slot, 0)
                filled[slot] = row + 1
                src.append(t)
                dst.append(group_of[slot] * bmm_rows + row)
        # Fast path: the short tokens already sit in x exactly in the padded layout.
        offset = src[0] - dst[0]
        contiguous = len(src) == bmm_slots * bmm_rows and all(t - d == offset for t, d in zip(src, dst))
        if contiguous:
            return TorchPlan(n, rank, groups, runs, bmm_slots, bmm_rows, None, None, offset, first, index)
        src_t = torch.tensor(src, dtype=torch.long, device=self.device)
        dst_t = torch.tensor(dst, dtype=torch.long, device=self.device)
        return TorchPlan(n, rank, groups, runs, bmm_slots, bmm_rows, src_t, dst_t, -1, first, index)

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: LoRAPlan
    ) -> None:
        """y: [T, out] += LoRA term; x: [T, in], a: [S, r_max, in], b: [S, out, r_max]."""
        assert isinstance(plan, TorchPlan), f"the torch backend cannot apply a {type(plan).__name__}"
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
        bt = b.transpose(1, 2)  # [S, r_max, out], the buffer's storage order
        if plan.bmm_index is None:
            a_used = a[plan.bmm_first : plan.bmm_first + slots, :r]  # [S', r, in], in place
            bt_used = bt[plan.bmm_first : plan.bmm_first + slots, :r]  # [S', r, out]
        else:
            a_used = a[:, :r].index_select(0, plan.bmm_index)  # [S', r, in], gathered
            bt_used = bt[:, :r].index_select(0, plan.bmm_index)  # [S', r, out]
        h = torch.bmm(xp, a_used.transpose(1, 2))  # [S', rows, r]
        d = torch.bmm(h, bt_used)  # [S', rows, out]
        d = d.view(slots * rows, -1)
        if plan.bmm_offset >= 0:
            y[plan.bmm_offset : plan.bmm_offset + slots * rows] += d
        else:
            y.index_add_(0, plan.bmm_src, d.index_select(0, plan.bmm_dst))
