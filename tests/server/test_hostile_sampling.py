"""Issue 13 §1 regression: one hostile request or adapter fails alone while other tenants stream on.

Before the fix, `temperature=1e-40` turned the logits into inf/NaN, torch.multinomial raised,
and the step had already advanced every sequence of the batch: all of them stopped after a
token or two and hung until their deadline, holding KV blocks and adapter pins. Each trigger
here is sent while 8 GenerateStream calls on several adapters are running; the victims must
complete with PEFT's exact tokens, and afterwards nothing may stay held.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from loraserve.adapters.synthetic import make_peft_adapter
from loraserve_client import AdapterRejected, AsyncClient, InvalidRequest, ServerError
from tests.helpers import PROMPTS, PeftReference, ServerThread, Toy, settle

VICTIMS = [(PROMPTS[i % len(PROMPTS)], ["", "a1", "org/a2", "a3"][i % 4]) for i in range(8)]
VICTIM_TOKENS = 120
HUGE = "hostile-huge"  # finite weights ~1e18: activations overflow float32 in a forward pass
ATTACK_PROMPT = "o gato"
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads of 16, fp32


@pytest.fixture(scope="module")
def hostile_server(toy: Toy, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("hostile") / "store"
    shutil.copytree(toy.store, store)
    make_peft_adapter(toy.base, store / HUGE, seed=13, weight_std=1e18)
    with ServerThread(
        model=str(toy.base),
        adapters_dir=store,
        max_loaded_adapters=4,
        kv_cache_bytes=96 * BLOCK_BYTES,  # 8 victims of ~130 tokens (9 blocks each) and the attacker
        max_num_seqs=16,
    ) as srv:
        yield srv


async def _round(target: str, attack: Callable[[AsyncClient], Awaitable[Any]]) -> tuple[list[list[int]], Any]:
    """Starts the victims, sends the attack once every victim has streamed, returns both outcomes."""
    async with AsyncClient(target, retries=0) as client:
        streaming = [asyncio.Event() for _ in VICTIMS]

        async def victim(i: int) -> list[int]:
            prompt, adapter = VICTIMS[i]
            tokens: list[int] = []
            async for chunk in client.generate_stream(
                prompt, adapter, max_new_tokens=VICTIM_TOKENS, ignore_eos=True, timeout=120
            ):
                tokens.extend(chunk.token_ids)
                streaming[i].set()
            return tokens

        victims = [asyncio.create_task(victim(i)) for i in range(len(VICTIMS))]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in streaming)), 120)
        try:
            outcome = await attack(client)
        except Exception as error:  # noqa: BLE001 - the attacker's failure is the outcome checked
            outcome = error
        return list(await asyncio.gather(*victims)), outcome


def _check_victims(tokens: list[list[int]], peft_ref: PeftReference) -> None:
    for (prompt, adapter), got in zip(VICTIMS, tokens):
        ids = peft_ref.tokenizer(prompt)["input_ids"]
        assert got == peft_ref.generate(ids, adapter, VICTIM_TOKENS, ignore_eos=True), (prompt, adapter)


def test_tiny_temperature_decodes_greedily_and_victims_finish(hostile_server, peft_ref) -> None:
    async def attack(client: AsyncClient) -> Any:
        return await client.generate(
            ATTACK_PROMPT, "a1", temperature=1e-40, max_new_tokens=8, ignore_eos=True, timeout=60
        )

    tokens, outcome = asyncio.run(_round(hostile_server.target, attack))
    _check_victims(tokens, peft_ref)
    ids = peft_ref.tokenizer(ATTACK_PROMPT)["input_ids"]
    assert not isinstance(outcome, Exception), outcome
    assert outcome.token_ids == peft_ref.generate(ids, "a1", 8, ignore_eos=True)  # greedy
    settle(hostile_server)


def test_tiny_repetition_penalty_is_refused_and_victims_finish(hostile_server, peft_ref) -> None:
    async def attack(client: AsyncClient) -> Any:
        return await client.generate(
            ATTACK_PROMPT, "a1", temperature=1.0, repetition_penalty=1e-38, max_new_tokens=8, timeout=60
        )

    tokens, outcome = asyncio.run(_round(hostile_server.target, attack))
    _check_victims(tokens, peft_ref)
    assert isinstance(outcome, InvalidRequest), outcome
    assert "repetition_penalty" in outcome.details
    settle(hostile_server)


def test_adapter_with_huge_weights_fails_alone(hostile_server, peft_ref) -> None:
    # Refused at load (FAILED_PRECONDITION, a bound on max |w|) or, where it loads, its
    # non-finite logits fail only its own request (INTERNAL with the request id).
    async def attack(client: AsyncClient) -> Any:
        return await client.generate(
            ATTACK_PROMPT, HUGE, temperature=0.8, seed=1, max_new_tokens=8, ignore_eos=True, timeout=60
        )

    tokens, outcome = asyncio.run(_round(hostile_server.target, attack))
    _check_victims(tokens, peft_ref)
    assert isinstance(outcome, (AdapterRejected, ServerError)), outcome
    if isinstance(outcome, ServerError):
        assert outcome.request_id and "request id" in outcome.details
    settle(hostile_server)
