"""The sampler against a plain per-row loop; a bad row (non-finite logits, hostile parameters) fails alone."""

from __future__ import annotations

import torch

from loraserve.engine.sampler import apply_repetition_penalty, filter_logits, sample
from loraserve.engine.sequence import (
    GREEDY_TEMPERATURE,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    SamplingParams,
)
from loraserve.errors import InternalError, InvalidArgument


def naive_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    row = logits.clone() / p.temperature
    if p.top_k > 0:
        kth = sorted(row.tolist(), reverse=True)[min(p.top_k, len(row)) - 1]
        row = torch.tensor([v if v >= kth else float("-inf") for v in row.tolist()])
    if p.top_p < 1.0:
        probs = row.softmax(-1)
        order = sorted(range(len(row)), key=lambda i: -probs[i].item())
        kept, total = set(), 0.0
        for i in order:
            kept.add(i)
            total += probs[i].item()
            if total >= p.top_p:
                break
        row = torch.tensor([v if i in kept else float("-inf") for i, v in enumerate(row.tolist())])
    return row.softmax(-1)


def test_filters_match_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=5),
        SamplingParams(temperature=2.0, top_p=0.8),
        SamplingParams(temperature=0.7, top_k=10, top_p=0.5),
        SamplingParams(temperature=1.3, top_k=1),
        SamplingParams(temperature=1.0, top_k=80, top_p=0.99),
    ]
    probs = filter_logits(logits, params)
    for i, p in enumerate(params):
        torch.testing.assert_close(probs[i], naive_probs(logits[i], p), rtol=1e-5, atol=1e-6)


def test_repetition_penalty_matches_a_plain_loop() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [1.0, 1.0, 1.0, 1.0]])
    seen = [[0, 1, 1], []]
    expected = logits.clone()
    for token in {0, 1}:
        value = expected[0, token]
        expected[0, token] = value / 1.5 if value > 0 else value * 1.5
    apply_repetition_penalty(logits, seen, [1.5, 1.5])
    torch.testing.assert_close(logits, expected)


def test_greedy_and_seeded_rows() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 100, generator=g)
    seeded = SamplingParams(temperature=1.0, seed=42)

    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    tokens = sample(
        logits,
        [SamplingParams(), seeded, SamplingParams(), seeded],
        [None, gen(42), None, gen(42)],
        [[], [], [], []],
    )
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    alone = sample(logits[1:2], [seeded], [gen(42)], [[]])
    assert tokens[1] == alone[0]
    # top_k=1 is greedy whatever the seed.
    assert sample(logits[3:4], [SamplingParams(temperature=5.0, top_k=1)], [gen(3)], [[]])[0] == int(
        logits[3].argmax()
    )


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    generator = torch.Generator().manual_seed(0)
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[sample(logits, [SamplingParams(temperature=1.0)], [generator], [[]])[0]] += 1
    assert abs(counts[0] / 3000 - 0.7) < 0.04 and abs(counts[2] / 3000 - 0.1) < 0.03


def naive_choice(logits: torch.Tensor, p: SamplingParams, seen: list[int]) -> torch.Tensor:
    """Float64 reference of one sampled row's distribution: penalty, temperature, filters, softmax."""
    row = logits.double().clone()
    for token in set(seen):
        row[token] = (
            row[token] / p.repetition_penalty if row[token] > 0 else row[token] * p.repetition_penalty
        )
    return naive_probs(row, p).double()


def test_one_bad_row_fails_only_its_own_request() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 40, generator=g) * 4
    logits[1, 7] = float("nan")  # a model or adapter gone wrong
    logits[3, 0] = float("inf")
    params = [
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=0.8, seed=2),
        SamplingParams(),
        SamplingParams(),
        SamplingParams(temperature=1.2, top_k=5, seed=3),
    ]

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in (1, 2, 0, 0, 3)]

    results = sample(logits, params, gens(), [[]] * 5)
    assert isinstance(results[1], InternalError) and isinstance(results[3], InternalError)
    assert "non-finite logits" in results[1].message
    fresh = gens()
    for row in (0, 2, 4):
        alone = sample(logits[row : row + 1], [params[row]], [fresh[row]], [[]])
        assert results[row] == alone[0], row


def test_tiny_temperature_is_greedy_and_never_divides() -> None:
    logits = torch.tensor([[1e30, -2.0, 3.0, 1e30 * 0.5], [0.1, 0.2, 0.3, 0.15]])
    for temperature in (1e-40, 1e-7, 0.0):
        params = SamplingParams(temperature=temperature, seed=5)
        assert params.greedy
        assert sample(logits, [params, params], [None, None], [[], []]) == [0, 2]
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy


def test_hostile_but_finite_inputs_give_a_valid_distribution() -> None:
    # Huge finite logits (an adapter with huge weights) and the smallest temperature that samples:
    # dividing first would overflow to inf and softmax would give NaN.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 30, generator=g) * 1e36
    params = [
        SamplingParams(temperature=GREEDY_TEMPERATURE),
        SamplingParams(temperature=MAX_TEMPERATURE, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=4),
    ]
    probs = filter_logits(logits, params)
    assert torch.isfinite(probs).all()
    for i, p in enumerate(params):
        torch.testing.assert_close(probs[i].double(), naive_choice(logits[i], p, []), rtol=1e-5, atol=1e-6)
    tokens = sample(logits, params, [torch.Generator().manual_seed(i) for i in range(3)], [[]] * 3)
    assert all(isinstance(t, int) for t in tokens)


def test_extreme_repetition_penalty_never_reaches_multinomial_as_nan() -> None:
    # 1e-38 multiplies seen positive logits by 1e38: float32 overflows to inf, and inf - inf is NaN.
    logits = torch.tensor([[5.0, 3.0, -1.0, 0.5, 4.0]])
    seen = [[0, 1]]
    for penalty in (1e-38, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY, 1e38):
        params = SamplingParams(temperature=1.0, repetition_penalty=penalty, seed=0)
        tokens = sample(logits, [params], [torch.Generator().manual_seed(0)], seen)
        assert isinstance(tokens[0], int)
        greedy = sample(logits, [SamplingParams(repetition_penalty=penalty)], [None], seen)[0]
        assert greedy == int(
            naive_choice(
                logits[0], SamplingParams(temperature=1.0, repetition_penalty=penalty), seen[0]
            ).argmax()
        )
    # Within the validated range the distribution is the float64 reference's.
    params = SamplingParams(temperature=0.7, repetition_penalty=MIN_REPETITION_PENALTY)
    penalised = logits.clone()
    apply_repetition_penalty(penalised, seen, [params.repetition_penalty])
    torch.testing.assert_close(
        filter_logits(penalised, [params])[0].double(),
        naive_choice(logits[0], params, seen[0]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_parameters_that_skipped_validation_fail_their_row_as_invalid_argument() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(4))
    params = [
        SamplingParams(temperature=float("nan"), seed=1),
        SamplingParams(),
        SamplingParams(top_p=0.0, temperature=1.0),
    ]
    results = sample(logits, params, [torch.Generator(), None, torch.Generator()], [[]] * 3)
    assert isinstance(results[0], InvalidArgument) and "temperature=nan" in results[0].message
    assert results[1] == int(logits[1].argmax())
    assert isinstance(results[2], InvalidArgument) and "top_p=0.0" in results[2].message


def test_a_failure_in_the_batched_path_is_retried_row_by_row() -> None:
    # A token id outside the vocabulary in one row's history makes the batched penalty raise;
    # retried alone, only that row fails and the others keep their seeded draws.
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(6))
    params = [SamplingParams(temperature=1.0, seed=1, repetition_penalty=1.3)] * 3
    seen = [[1, 2], [999], [3]]

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(3)]

    results = sample(logits, params, gens(), seen)
    assert isinstance(results[1], InternalError)
    fresh = gens()
    for row in (0, 2):
        assert results[row] == sample(logits[row : row + 1], [params[row]], [fresh[row]], [seen[row]])[0]


def test_huge_finite_rows_whose_sum_overflows_are_still_finite() -> None:
    # The finiteness check sums each row first; a sum that overflows must not fail the row.
    logits = torch.full((2, 8), 3e38)
    logits[0, 2] = 3.3e38
    logits[1, 4] = float("nan")
    results = sample(logits, [SamplingParams(), SamplingParams()], [None, None], [[], []])
    assert results[0] == 2 and isinstance(results[1], InternalError)
