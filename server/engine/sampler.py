"""Next-token choice for a batch: greedy, temperature, top-k, top-p, repetition penalty.

Filters run batched over rows; each sampled row draws from its own seeded generator, so a
request's output depends on its seed and logits only, never on what shares the batch.
"""

from __future__ import annotations

import torch

from loraserve.engine.sequence import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: list[list[int]], penalties: list[float]) -> None:
    """CTRL-style, in place: for tokens already seen, positive logits / p, negative * p."""
    for row, (ids, penalty) in enumerate(zip(seen, penalties)):
        if penalty == 1.0 or not ids:
            continue
        index = torch.tensor(sorted(set(ids)), dtype=torch.long, device=logits.device)
        values = logits[row, index]
        logits[row, index] = torch.where(values > 0, values / penalty, values * penalty)


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and top-p on rows to be sampled; returns probabilities [B, V]."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    logits = logits / temperature
    vocab = logits.shape[1]
    top_k = [min(p.top_k, vocab) for p in params]
    if any(0 < k < vocab for k in top_k):
        k_max = max(top_k)
        kth = torch.topk(logits, k_max, dim=-1).values  # [B, k_max]
        ks = torch.tensor([k if k > 0 else k_max for k in top_k], device=device)
        threshold = kth.gather(1, (ks - 1)[:, None])  # [B, 1]: each row's k-th largest logit
        active = torch.tensor([0 < k < vocab for k in top_k], device=device)[:, None]
        logits = torch.where(active & (logits < threshold), float("-inf"), logits)
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    if bool((top_p < 1.0).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first is always kept).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    seen: list[list[int]],
) -> list[int]:
    """logits: [B, V] float32 -> one token id per row."""
    penalties = [p.repetition_penalty for p in params]
    if any(p != 1.0 for p in penalties):
        logits = logits.clone()
        apply_repetition_penalty(logits, seen, penalties)
    chosen = logits.argmax(dim=-1).tolist()
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        probs = filter_logits(logits.index_select(0, index), [params[i] for i in sampled_rows]).cpu()
        for j, row in enumerate(sampled_rows):
            chosen[row] = int(torch.multinomial(probs[j], 1, generator=generators[row]).item())
    return chosen
