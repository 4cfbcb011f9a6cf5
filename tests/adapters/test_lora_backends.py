"""Every LoRA backend against the `reference` backend, and the reference against a dense formulation.

Cases: mixed ranks, empty slots (no adapter, or no token this step), base-only tokens (slot -1),
T=1, long prefill runs next to decode tokens, unsorted and split runs; in float32 and bfloat16.
"""

from __future__ import annotations

import random

import pytest
import torch

from loraserve.adapters.lora_backends import (
    BACKENDS,
    LoRABackend,
    ReferenceBackend,
    SlotGroups,
    TorchBackend,
    select_lora_backend,
)

CPU = torch.device("cpu")
LONG = 37  # a prefill chunk
N_IN, N_OUT = 24, 40
# (rtol, atol) of a backend in `dtype` against the float64 reference on the same rounded inputs.
# bfloat16 keeps 8 bits of mantissa (relative step 2**-8 = 0.004); the backends round the shrink
# result h and the sum y + Δ to bfloat16, so a few steps of error on O(1) values.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
SERVING_BACKENDS = sorted(set(BACKENDS) - {"reference"})

RANKS = [4, 0, 8, 2, 8, 0]  # slots 1 and 5 hold no adapter (rank 0, all zeros)
CASES = {
    "decode one token per slot in order": [0, 2, 3, 4],
    "decode with base tokens": [-1, 0, -1, 3, 3, 4],
    "a token on an empty slot": [0, 1, 2],
    "slots without tokens between used ones": [0, 4],
    "slots out of order and repeated": [4, 4, 2, 0, 0, 0, 3],
    "split runs of one slot": [2, 3, 2, 3, 2],
    "long prefill run + decodes": [3] * LONG + [0, 2, 4],
    "two long runs": [0] * LONG + [4] * (LONG + 1),
    "prefill with base decodes": [-1, -1] + [2] * LONG,
    "base only": [-1, -1, -1],
    "T=1": [2],
    "T=1 base only": [-1],
}


def _weights(ranks: list[int], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked slot buffers a: [S, r_max, in], b: [S, out, r_max], zero past each slot's rank; scaled
    so that the LoRA term is O(1), as in a trained adapter."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(max(ranks), 1)
    a = torch.zeros(len(ranks), r_max, N_IN)
    b = torch.zeros(len(ranks), N_OUT, r_max)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, N_IN, generator=g) / N_IN**0.5
        b[s, :, :r] = torch.randn(N_OUT, r, generator=g) / max(r, 1) ** 0.5
    return a.to(dtype), b.to(dtype)


def _inputs(num_tokens: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(num_tokens, N_IN, generator=g).to(dtype)  # [T, in]
    y = torch.randn(num_tokens, N_OUT, generator=g).to(dtype)  # [T, out]: the base layer's output
    return x, y


def _run(backend: LoRABackend, slots: list[int], ranks: list[int], y, x, a, b) -> torch.Tensor:
    y = y.clone()
    backend.apply(y, x, a, b, backend.plan(slots, ranks))
    return y


def _expected(slots: list[int], ranks: list[int], y, x, a, b) -> torch.Tensor:
    """The reference backend in float64 on the same (already rounded) inputs."""
    f64 = [t.double() for t in (y, x, a, b)]
    return _run(ReferenceBackend(CPU), slots, ranks, *f64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", SERVING_BACKENDS)
def test_backend_matches_reference(name: str, case: str, dtype: torch.dtype) -> None:
    slots = CASES[case]
    a, b = _weights(RANKS, dtype, seed=0)
    x, y = _inputs(len(slots), dtype, seed=0)
    ours = _run(select_lora_backend(name, CPU), slots, RANKS, y, x, a, b)
    assert ours.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(ours.double(), _expected(slots, RANKS, y, x, a, b), rtol=rtol, atol=atol)
    if all(s < 0 or RANKS[s] == 0 for s in slots):
        assert torch.equal(ours, y)  # nothing to add: y untouched, bit for bit


@pytest.mark.parametrize("name", SERVING_BACKENDS)
def test_random_batches_match_reference(name: str) -> None:
    rng = random.Random(7)
    backend = select_lora_backend(name, CPU)
    for trial in range(40):
        n = rng.choice([1, rng.randint(2, 12), rng.randint(13, 90)])
        slots = [rng.choice([-1, 0, 1, 2, 3, 4, 5]) for _ in range(n)]
        if rng.random() < 0.5:
            slots.sort()  # the runner's order: one slot's tokens together
        ranks = [rng.choice([0, 1, 3, 8, 16]) for _ in range(6)]
        a, b = _weights(ranks, torch.float32, seed=trial)
        x, y = _inputs(n, torch.float32, seed=trial)
        ours = _run(backend, slots, ranks, y, x, a, b)
        expected = _expected(slots, ranks, y, x, a, b)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5, msg=f"{slots} {ranks}")


def test_reference_matches_a_dense_formulation() -> None:
    """The reference loop against gathered per-token weights and einsums (slot -1 masked out)."""
    slots = [3, -1, 0, 0, 4, -1, 2, 3]
    a, b = _weights(RANKS, torch.float64, seed=3)
    x, y = _inputs(len(slots), torch.float64, seed=3)
    index = torch.tensor(slots).clamp(min=0)
    h = torch.einsum("ti,tri->tr", x, a[index])  # [T, r_max]
    delta = torch.einsum("tr,tor->to", h, b[index]) * (torch.tensor(slots) >= 0)[:, None]  # [T, out]
    torch.testing.assert_close(_run(ReferenceBackend(CPU), slots, RANKS, y, x, a, b), y + delta)


def test_slot_groups_sort_tokens_by_slot_stably() -> None:
    groups = SlotGroups.of([2, -1, 0, 2, 0, -1, 5], [4, 0, 8, 0, 0, 16])
    assert groups.order == (2, 4, 0, 3, 6)
    assert groups.slots == (0, 2, 5) and groups.starts == (0, 2, 4) and groups.counts == (2, 2, 1)
    assert groups.ranks == (4, 8, 16) and groups.max_count == 2
    empty = SlotGroups.of([-1, -1], [4])
    assert empty.order == () and empty.slots == () and empty.max_count == 0


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_plans_carry_the_groups_and_the_step_rank(name: str) -> None:
    plan = select_lora_backend(name, CPU).plan([-1, 3, 3, 0], [2, 0, 0, 6, 16])
    assert plan.num_tokens == 4 and plan.rank == 6 and not plan.empty
    assert plan.groups == SlotGroups.of([-1, 3, 3, 0], [2, 0, 0, 6, 16])
    assert select_lora_backend(name, CPU).plan([-1], [2]).empty


def test_backend_selection() -> None:
    assert isinstance(select_lora_backend("auto", CPU), TorchBackend)
    assert isinstance(select_lora_backend("torch", CPU), TorchBackend)
    assert isinstance(select_lora_backend("reference", CPU), ReferenceBackend)
    with pytest.raises(ValueError, match="triton LoRA backend cannot run here: it needs a CUDA device"):
        select_lora_backend("triton", CPU)
    with pytest.raises(ValueError, match="unknown LoRA backend 'cuda'"):
        select_lora_backend("cuda", CPU)


HIGH_SLOT_CASES = {
    "decodes in sparse high slots": [3, 700, 1023, 512],
    "decodes in high slots, sorted, with repeats": [640, 640, 641, 900, 900, 1023],
    "high slots next to low ones and base tokens": [-1, 0, 1000, -1, 1, 999],
    "a prefill run in a high slot + decodes": [800] * LONG + [2, 801, 1023],
    "dense range far from slot 0": [900, 901, 902, 903, 904],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(HIGH_SLOT_CASES))
@pytest.mark.parametrize("name", SERVING_BACKENDS)
def test_backend_matches_reference_on_high_slot_indices(name: str, case: str, dtype: torch.dtype) -> None:
    """1,024 slots, a few used, far from slot 0: gathered or in-place bmm, the same LoRA term."""
    slots = HIGH_SLOT_CASES[case]
    rng = random.Random(case)
    ranks = [rng.choice([0, 2, 4, 8]) for _ in range(1024)]
    for slot in slots:
        ranks[slot] = ranks[slot] or 8  # every used slot holds an adapter
    a, b = _weights(ranks, dtype, seed=5)
    x, y = _inputs(len(slots), dtype, seed=5)
    ours = _run(select_lora_backend(name, CPU), slots, ranks, y, x, a, b)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(ours.double(), _expected(slots, ranks, y, x, a, b), rtol=rtol, atol=atol)
