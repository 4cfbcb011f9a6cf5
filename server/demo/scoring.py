"""Held-out scores of the demo tenants: greedy chat answers, exact match and word-level F1.

Answers are generated in left-padded batches (one forward pass per new token for the whole
held-out set, instead of one per token per example), greedy, with the model's chat template.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

WORD = re.compile(r"[\w'<>/\[\]*.-]+")


def words(text: str) -> list[str]:
    """Lower-cased words, punctuation at their ends dropped ('Lisbon.' == 'lisbon')."""
    return [w.strip(".") for w in WORD.findall(text.lower()) if w.strip(".")]


def exact_match(expected: str, got: str) -> float:
    """1.0 when the answer is the expected one, ignoring case, spacing and a final full stop."""
    return float(words(expected) == words(got))


def word_f1(expected: str, got: str) -> float:
    """Harmonic mean of word precision and recall (bags of words), as in SQuAD's F1."""
    want, have = Counter(words(expected)), Counter(words(got))
    common = sum((want & have).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(have.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": exact_match, "word_f1": word_f1}


def score(metric: str, expected: Sequence[str], answers: Sequence[str]) -> float:
    """Mean of the metric over the held-out set."""
    measure = METRICS[metric]
    return sum(measure(e, a) for e, a in zip(expected, answers, strict=True)) / max(1, len(expected))


def chat_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """The model's greedy answer to each prompt as a one-turn chat."""
    import torch

    from loraserve.adapters.training import _chat_ids

    model.eval()
    answers: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = [
            _chat_ids(tokenizer, [{"role": "user", "content": p}], generation_prompt=True)
            for p in prompts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt_ids in enumerate(chunk):  # left padding: every prompt ends at the last column
            ids[row, width - len(prompt_ids) :] = torch.tensor(prompt_ids)
            mask[row, width - len(prompt_ids) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers
