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
    assert choose_bmm_slots([(5, 0, 200)]) == set()  # a long prefill in slot 5: no padding of slots 0-4
    plan = BACKEND.plan([s for s in range(31)] + [31] * 31, [4] * 32)
    assert plan.runs == ((31, 31, 62),) and plan.bmm_slots == 31 and plan.bmm_rows == 1
