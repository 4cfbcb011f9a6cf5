"""End to end over a real port: greedy outputs equal PEFT's for each adapter on the NF4 base."""

from __future__ import annotations

import pytest

from loraserve_client import Client
from tests.helpers import PROMPTS, TOY_ADAPTERS

MAX_NEW = 12


@pytest.mark.parametrize("adapter", ["", *TOY_ADAPTERS])
def test_generate_matches_peft(client: Client, peft_ref, adapter: str) -> None:
    for prompt in PROMPTS[:3]:
        ids = peft_ref.tokenizer(prompt)["input_ids"]
        expected = peft_ref.generate(ids, adapter, MAX_NEW)
        result = client.generate(prompt, adapter, max_new_tokens=MAX_NEW)
        assert result.token_ids == expected, (prompt, adapter)
        assert result.usage.prompt_tokens == len(ids)
        assert result.usage.completion_tokens == len(expected)


def test_adapters_change_the_output(client: Client) -> None:
    outputs = {
        a: tuple(client.generate(PROMPTS[0], a, max_new_tokens=8).token_ids) for a in ["", *TOY_ADAPTERS]
    }
    assert len(set(outputs.values())) == len(outputs), outputs


def test_stream_concatenates_to_generate(client: Client) -> None:
    for adapter in ["", "a1", "org/a2"]:
        whole = client.generate(PROMPTS[1], adapter, max_new_tokens=20)
        chunks = list(client.generate_stream(PROMPTS[1], adapter, max_new_tokens=20))
        assert "".join(c.text for c in chunks) == whole.text
        assert [t for c in chunks for t in c.token_ids] == whole.token_ids
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert chunks[-1].finish_reason == whole.finish_reason
        assert chunks[-1].usage == whole.usage
