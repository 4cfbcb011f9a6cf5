"""The generation core without any transport: plain values in, deltas and one final record out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from loraserve.engine.sequence import FinishReason
from loraserve.errors import InvalidArgument
from loraserve.generation import GenerationCore, GenerationInput, Usage
from loraserve.logs import REQUEST_LOGGER
from loraserve.metrics import Metrics
from loraserve.validation import ChatMessage, Limits, StoppingSpec
from tests.helpers import PROMPTS


@pytest.fixture
def core(server) -> GenerationCore:
    engine = server.engine
    limits = Limits.from_config(server.server.config, engine.loaded.max_context_length)
    return GenerationCore(engine.loaded, engine, limits, Metrics())


def _input(request_id: str, **fields) -> GenerationInput:
    return GenerationInput(request_id=request_id, **fields)


def wait_idle(engine, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)


def test_complete_matches_peft_and_is_recorded_once(core, peft_ref, caplog) -> None:
    ids = peft_ref.tokenizer(PROMPTS[0])["input_ids"]
    request = _input("core-1", adapter_id="a1", prompt=PROMPTS[0], stopping=StoppingSpec(max_new_tokens=8))
    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER):
        completion = asyncio.run(core.complete(request))
    expected = peft_ref.generate(ids, "a1", 8)
    assert completion.token_ids == expected
    assert completion.final.usage == Usage(len(ids), len(expected))
    assert completion.final.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    timings = completion.final.timings
    assert 0 <= timings.queue_seconds <= timings.total_seconds
    lines = [r for r in caplog.records if r.name == REQUEST_LOGGER and r.request_id == "core-1"]
    assert len(lines) == 1 and lines[0].adapter == "a1" and lines[0].output_tokens == len(expected)
    assert core.metrics.requests.labels(completion.final.finish_reason.value, "a1")._value.get() == 1


def test_stream_ends_with_the_final_record(core) -> None:
    async def collect():
        return [d async for d in core.stream(_input("core-2", prompt=PROMPTS[1], stopping=StoppingSpec(12)))]

    deltas = asyncio.run(collect())
    assert all(d.final is None for d in deltas[:-1]) and deltas[-1].final is not None
    whole = asyncio.run(core.complete(_input("core-3", prompt=PROMPTS[1], stopping=StoppingSpec(12))))
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert "".join(d.text for d in deltas) == whole.text


def test_prompt_ids_and_text_give_the_same_generation(core, peft_ref) -> None:
    ids = peft_ref.tokenizer(PROMPTS[2])["input_ids"]
    by_text = asyncio.run(core.complete(_input("core-4", prompt=PROMPTS[2], stopping=StoppingSpec(6))))
    by_ids = asyncio.run(core.complete(_input("core-5", prompt_ids=tuple(ids), stopping=StoppingSpec(6))))
    assert by_ids.token_ids == by_text.token_ids and by_ids.final.usage == by_text.final.usage


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt_ids": (10**6,)}, "prompt_ids[0] = 1000000 is not a token id"),
        ({"prompt_ids": ()}, "prompt_ids is empty"),
        ({"prompt": "hi", "messages": (ChatMessage("user", "hi"),)}, "exactly one of prompt"),
        ({}, "exactly one of prompt"),
        ({"prompt": "hi", "stopping": StoppingSpec(stop_sequences=("",))}, "stop_sequences[0] is empty"),
    ],
)
def test_bad_plain_input_is_refused_before_the_engine(core, fields, message) -> None:
    with pytest.raises(InvalidArgument) as caught:
        asyncio.run(core.complete(_input("core-bad", **fields)))
    assert message in caught.value.message
    assert core.engine.in_flight == 0


def test_leaving_a_stream_early_releases_its_request(core) -> None:
    engine = core.engine
    request = _input("core-6", adapter_id="org/a2", prompt="hi", stopping=StoppingSpec(200, ignore_eos=True))

    async def first_delta_only() -> int:
        async with contextlib.aclosing(core.stream(request)) as stream:
            async for delta in stream:
                return len(delta.token_ids)
        return 0

    assert asyncio.run(first_delta_only()) >= 1
    wait_idle(engine)
    assert engine.in_flight == 0 and engine.blocks.num_free == engine.blocks.num_blocks
    assert all(row.in_flight == 0 for row in engine.adapters.describe())


def test_the_engine_backstop_is_the_callers_deadline_plus_grace() -> None:
    # The engine counts max_time_seconds from the arrival: time spent before submission (a long
    # prompt tokenized in a busy thread pool) must not end the request before the caller's deadline.
    from loraserve.generation import DEADLINE_GRACE_SECONDS

    class Loaded:
        tokenizer = [None] * 100  # only its length (the vocabulary) is read for prompt ids

    limits = Limits(
        max_context_length=64,
        max_prompt_tokens=32,
        max_prompt_chars=1000,
        max_messages=8,
        max_stop_sequences=4,
        max_stop_sequence_chars=16,
        default_max_new_tokens=8,
        max_request_seconds=600.0,
    )
    core = GenerationCore(Loaded(), None, limits, None)
    arrival = time.monotonic() - 5.0  # 5 s ago
    request = _input("backstop", prompt_ids=(1, 2, 3), arrival=arrival, deadline=arrival + 10.0)
    generation, _ = asyncio.run(core._engine_request(request))
    engine_deadline = generation.arrival + generation.stopping.max_time_seconds
    assert engine_deadline == pytest.approx(request.deadline + DEADLINE_GRACE_SECONDS, abs=1e-6)
