"""The batched LoRA op against the naive per-token loop."""

from __future__ import annotations

import random

import pytest
import torch

from loraserve.adapters.ops import apply_lora, choose_bmm_slots, lora_reference, make_plan

LONG = 37  # a prefill chunk

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _case(slots_of_token: list[int], num_slots: int, ranks: list[int], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_in, n_out, r_max = 24, 40, max(ranks)
    a = torch.zeros(num_slots, r_max, n_in, dtype=dtype)
    b = torch.zeros(num_slots, n_out, r_max, dtype=dtype)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, n_in, generator=g).to(dtype)
        b[s, :, :r] = torch.randn(n_out, r, generator=g).to(dtype)
    x = torch.randn(len(slots_of_token), n_in, generator=g).to(dtype)
    base = torch.randn(len(slots_of_token), n_out, generator=g).to(dtype)
    return x, base, a, b


CASES = {
    "decode one token per slot in order": [0, 1, 2, 3],
    "decode with base rows": [-1, 0, -1, 2, 2, 3],
    "slots out of order and repeated": [3, 3, 1, 0, 0, 0, 2],
    "split runs of one slot": [1, 2, 1, 2, 1],
    "long prefill run + decodes": [2] * (LONG) + [0, 1, 3],
    "two long runs": [0] * LONG + [3] * (LONG + 1),
    "base only": [-1, -1, -1],
    "single token": [1],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_apply_lora_matches_reference(name: str, dtype: torch.dtype) -> None:
    slots = CASES[name]
    x, base, a, b = _case(slots, num_slots=4, ranks=[4, 8, 2, 8], dtype=dtype)
    expected = base.float() + lora_reference(x.float(), slots, a.float(), b.float())
    y = base.clone()
    apply_lora(y, x, a, b, make_plan(slots, [4, 8, 2, 8], torch.device("cpu")))
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(y.float(), expected, rtol=rtol, atol=atol * 10)


def test_random_batches_match_reference() -> None:
    rng = random.Random(7)
    for trial in range(30):
        n = rng.randint(1, 80)
        slots = [rng.choice([-1, 0, 1, 2, 3, 4, 5]) for _ in range(n)]
        if rng.random() < 0.5:
            slots.sort()
        ranks = [rng.randint(1, 8) for _ in range(6)]
        x, base, a, b = _case(slots, 6, ranks, torch.float32, seed=trial)
        y = base.clone()
        apply_lora(y, x, a, b, make_plan(slots, ranks, torch.device("cpu")))
        torch.testing.assert_close(y, base + lora_reference(x, slots, a, b), rtol=1e-5, atol=1e-5)


def test_plan_uses_the_contiguous_fast_path_for_sorted_decodes() -> None:
    plan = make_plan([0, 1, 2, 3], [4, 4, 4, 4], torch.device("cpu"))
    assert plan.bmm_offset == 0 and plan.bmm_src is None and plan.bmm_slots == 4 and plan.bmm_rows == 1
    plan = make_plan([-1, 0, 1], [4, 4], torch.device("cpu"))
    assert plan.bmm_offset == 1


def test_plan_rank_is_the_highest_used_rank() -> None:
    plan = make_plan([0, 2], [3, 16, 5], torch.device("cpu"))
    assert plan.rank == 5
    assert make_plan([-1], [3], torch.device("cpu")).empty


def test_a_prefill_chunk_does_not_pad_every_slot() -> None:
    decodes = [(s, s, s + 1) for s in range(31)]
    chunk = (31, 31, 62)
    assert choose_bmm_slots([*decodes, chunk]) == set(range(31))  # the chunk runs on its own
    grouped = [(s, 8 * s, 8 * s + 8) for s in range(8)]  # 8 adapters with 8 decodes each
    assert choose_bmm_slots(grouped) == set(range(8))
    assert choose_bmm_slots([(5, 0, 200)]) == set()  # a long prefill in slot 5: no padding of slots 0-4
