"""The sampler against a plain per-row loop."""

from __future__ import annotations

import torch

from loraserve.engine.sampler import apply_repetition_penalty, filter_logits, sample
from loraserve.engine.sequence import SamplingParams


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
