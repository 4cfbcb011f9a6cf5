"""The torch backend's plan: its cost model and its no-gather fast path (its results are checked
against the reference backend in test_lora_backends.py)."""

from __future__ import annotations

import torch

from loraserve.adapters.lora_backends import TorchBackend
from loraserve.adapters.lora_backends.torch_backend import choose_bmm_slots

BACKEND = TorchBackend(torch.device("cpu"))


def test_plan_uses_the_contiguous_fast_path_for_sorted_decodes() -> None:
    plan = BACKEND.plan([0, 1, 2, 3], [4, 4, 4, 4])
    assert plan.bmm_offset == 0 and plan.bmm_src is None and plan.bmm_slots == 4 and plan.bmm_rows == 1
    plan = BACKEND.plan([-1, 0, 1], [4, 4])
    assert plan.bmm_offset == 1 and plan.bmm_src is None


def test_plan_gathers_when_the_padded_layout_has_holes() -> None:
    plan = BACKEND.plan([0, 2], [4, 4, 4])  # slot 1 has no token: row 1 of the padded layout is a hole
    assert plan.bmm_offset == -1 and plan.bmm_slots == 3 and plan.bmm_rows == 1
    assert plan.bmm_src.tolist() == [0, 1] and plan.bmm_dst.tolist() == [0, 2]


def test_plan_rank_is_the_highest_used_rank() -> None:
    plan = BACKEND.plan([0, 2], [3, 16, 5])
    assert plan.rank == 5
    assert BACKEND.plan([-1], [3]).empty


def test_a_prefill_chunk_does_not_pad_every_slot() -> None:
    decodes = [(s, s, s + 1) for s in range(31)]
    chunk = (31, 31, 62)
    assert choose_bmm_slots([*decodes, chunk]) == set(range(31))  # the chunk runs on its own
    grouped = [(s, 8 * s, 8 * s + 8) for s in range(8)]  # 8 adapters with 8 decodes each
    assert choose_bmm_slots(grouped) == set(range(8))
    alone = BACKEND.plan([5] * 200, [4] * 6)  # a long prefill in slot 5: no padding of slots 0-4
    assert alone.bmm_slots <= 1 and (alone.bmm_slots == 0 or alone.bmm_first == 5)
    plan = BACKEND.plan([s for s in range(31)] + [31] * 31, [4] * 32)
    assert plan.runs == ((31, 31, 62),) and plan.bmm_slots == 31 and plan.bmm_rows == 1


def test_sparse_high_slots_are_gathered_not_padded_from_slot_zero() -> None:
    """One decode in slot 700 and one in slot 1000 compute 2 groups, not 1,001 (or 301)."""
    plan = BACKEND.plan([700, 1000], [8] * 1024)
    assert plan.runs == () and plan.bmm_slots == 2 and plan.bmm_index.tolist() == [700, 1000]
    assert plan.bmm_offset == 0  # the two tokens already sit in the gathered layout


def test_a_dense_range_far_from_slot_zero_is_read_in_place() -> None:
    plan = BACKEND.plan([900, 901, 902, 903], [8] * 1024)
    assert plan.bmm_index is None and plan.bmm_first == 900 and plan.bmm_slots == 4
    plan = BACKEND.plan([900, 902], [8] * 1024)  # one hole: still cheaper in place than a copy
    assert plan.bmm_index is None and plan.bmm_first == 900 and plan.bmm_slots == 3


def test_the_cost_of_a_step_follows_its_distinct_adapters_not_the_highest_slot() -> None:
    low = [(s, s, s + 1) for s in range(8)]
    high = [(s, i, i + 1) for i, s in enumerate(range(0, 1024, 128))]
    assert choose_bmm_slots(low) == set(range(8))
    assert choose_bmm_slots(high) == set(range(0, 1024, 128))  # still one bmm, gathered
    assert BACKEND.plan(list(range(0, 1024, 128)), [4] * 1024).bmm_slots == 8
