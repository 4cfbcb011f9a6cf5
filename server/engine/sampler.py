"""Next-token choice for a batch: greedy, temperature, top-k, top-p, repetition penalty.

Total by design: `sample` gives every row either a token id or its own error, and never raises
for the batch, so one bad row fails only its own request. A row whose logits the model made
non-finite gets an InternalError (the model or its adapter is at fault); a row whose sampling
parameters turn finite logits into no distribution gets an InvalidArgument (only parameters
that skipped request validation can). Finite logits are brought into range before the
temperature divides them (penalised values clamped to float32's range, then the row's maximum
subtracted, which softmax ignores), so no temperature or penalty overflows them into NaN.

Filters run batched over rows; each sampled row draws from its own seeded generator, so a
request's output depends on its seed and logits only, never on what shares the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from loraserve.engine.sequence import SamplingParams
from loraserve.errors import InternalError, InvalidArgument, ServeError

log = logging.getLogger(__name__)


def apply_repetition_penalty(logits: torch.Tensor, seen: list[list[int]], penalties: list[float]) -> None:
    """CTRL-style, in place: for tokens already seen, positive logits / p, negative * p."""
    for row, (ids, penalty) in enumerate(zip(seen, penalties)):
        if penalty == 1.0 or not ids:
            continue
        index = torch.tensor(sorted(set(ids)), dtype=torch.long, device=logits.device)
        values = logits[row, index]
        logits[row, index] = torch.where(values > 0, values / penalty, values * penalty)


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and top-p on rows to be sampled; returns probabilities [B, V].

    The rows' maximum is subtracted before the temperature divides them: softmax is unchanged,
    and every value lies in [-inf, 0] whatever the temperature, so none becomes NaN.
    """
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]  # [B, 1]
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
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
) -> list[int | ServeError]:
    """logits: [B, V] float32 -> per row, a token id or the error that ends that row's request."""
    try:
        return _sample_batch(logits, params, generators, seen)
    except Exception:  # isolated below: each row alone, so that only a bad row fails
        log.exception("batched sampling of %d rows failed; sampling each row alone", len(params))
    results: list[int | ServeError] = []
    for row in range(len(params)):
        try:
            results.extend(
                _sample_batch(
                    logits[row : row + 1],
                    params[row : row + 1],
                    generators[row : row + 1],
                    seen[row : row + 1],
                )
            )
        except Exception as error:  # noqa: BLE001 - becomes this request's error
            results.append(InternalError(f"sampling failed: {error}"))
    return results


def _sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    seen: list[list[int]],
) -> list[int | ServeError]:
    """The batched path; generators are used last, one row at a time, so a failure before that
    leaves every generator untouched for the row-by-row retry."""
    results: list[int | ServeError] = [0] * len(params)
    finite = _rows_where(logits, torch.isfinite)  # [B]
    for row, ok in enumerate(finite):
        if not ok:
            results[row] = InternalError("the model produced non-finite logits for this request")
    usable = finite
    penalties = [p.repetition_penalty for p in params]
    if any(p != 1.0 for p in penalties):
        logits = logits.clone()
        apply_repetition_penalty(logits, seen, penalties)
        # A tiny penalty can overflow a large logit to inf; inf - inf would be NaN downstream.
        limit = torch.finfo(logits.dtype).max
        logits = logits.clamp(-limit, limit)
        usable = _rows_where(logits, lambda x: ~torch.isnan(x))  # [B]: NaN now only from a NaN penalty
    chosen = logits.argmax(dim=-1).tolist()
    sampled_rows = []
    for row, p in enumerate(params):
        if not finite[row]:
            continue
        if not usable[row]:
            results[row] = _no_distribution(p)
        elif p.greedy:
            results[row] = chosen[row]
        else:
            sampled_rows.append(row)
    if not sampled_rows:
        return results
    index = torch.tensor(sampled_rows, device=logits.device)
    probs = filter_logits(logits.index_select(0, index), [params[i] for i in sampled_rows]).cpu()  # [S, V]
    valid = (probs.sum(dim=-1) > 0).tolist()  # [S]: False for a NaN row (softmax gives no inf)
    for j, row in enumerate(sampled_rows):
        if not valid[j]:
            results[row] = _no_distribution(params[row])
            continue
        try:
            results[row] = int(torch.multinomial(probs[j], 1, generator=generators[row]).item())
        except RuntimeError as error:
            results[row] = InternalError(f"sampling failed: {error}")
    return results


def _rows_where(logits: torch.Tensor, holds: Callable[[torch.Tensor], torch.Tensor]) -> list[bool]:
    """logits [B, V] -> per row, whether `holds` is true of every value.

    `holds` is finiteness or less, so a row whose sum is finite passes; only rows whose sum is
    not (a NaN or inf in them, or huge values overflowing the sum) are checked value by value.
    One reduction instead of a [B, V] mask: the check runs on every step.
    """
    passed = torch.isfinite(logits.sum(dim=-1)).tolist()
    doubtful = [row for row, ok in enumerate(passed) if not ok]
    if doubtful:
        exact = holds(logits[doubtful]).all(dim=-1).tolist()
        for row, ok in zip(doubtful, exact):
            passed[row] = ok
    return passed


def _no_distribution(p: SamplingParams) -> InvalidArgument:
    return InvalidArgument(
        f"sampling parameters give no next-token distribution: temperature={p.temperature}, "
        f"top_k={p.top_k}, top_p={p.top_p}, repetition_penalty={p.repetition_penalty}"
    )
