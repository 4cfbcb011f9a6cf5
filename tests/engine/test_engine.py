"""Continuous batching: batch invariance, KV accounting, preemption, chunked prefill, fairness."""

from __future__ import annotations

import random
import time

from loraserve.engine.sequence import FinishReason, SamplingParams
from tests.helpers import PROMPTS, TOY_ADAPTERS

ADAPTERS = ["", *TOY_ADAPTERS]


def _workload(n: int, seed: int = 0) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    return [
        (
            rng.choice(PROMPTS) + " " * rng.randint(0, 2) + rng.choice(PROMPTS)[: rng.randint(0, 8)],
            ADAPTERS[i % len(ADAPTERS)],
            rng.randint(4, 16),
        )
        for i in range(n)
    ]


def test_batch_invariance_with_staggered_arrivals(make_driver, peft_ref) -> None:
    driver = make_driver(max_loaded_adapters=6)
    jobs = _workload(20)
    outcomes = []
    for i, (prompt, adapter, max_new) in enumerate(jobs):
        outcomes.append(driver.submit(prompt, adapter, max_new)[1])
        if i % 3 == 2:  # a few steps between arrivals: new requests join a running batch
            for _ in range(2):
                driver.engine.step()
    driver.run(outcomes)
    assert driver.engine.steps > 0
    alone = make_driver(max_loaded_adapters=1)
    for (prompt, adapter, max_new), outcome in zip(jobs, outcomes):
        ids = driver.tokenizer(prompt)["input_ids"]
        expected = peft_ref.generate(ids, adapter, max_new)
        assert outcome.token_ids == expected, (prompt, adapter)
        assert alone.generate(prompt, adapter, max_new).token_ids == outcome.token_ids
    assert driver.engine.blocks.num_free == driver.engine.blocks.num_blocks


def test_tiny_pool_forces_preemption_and_everything_completes_right(make_driver, peft_ref) -> None:
    # 6 blocks of 4 tokens: a few requests of ~10-30 tokens each cannot all stay resident.
    driver = make_driver(block_size=4, kv_cache_bytes=6 * 2 * 2 * 4 * 2 * 16 * 4, max_num_seqs=8)
    assert driver.engine.blocks.num_blocks == 6
    jobs = [(PROMPTS[i % 4], ADAPTERS[i % 4], 12) for i in range(6)]
    outcomes = [driver.submit(p, a, n, ignore_eos=True)[1] for p, a, n in jobs]
    driver.run(outcomes)
    assert driver.engine.scheduler.preemptions > 0
    for (prompt, adapter, max_new), outcome in zip(jobs, outcomes):
        ids = driver.tokenizer(prompt)["input_ids"]
        assert outcome.finish_reason is FinishReason.LENGTH
        assert len(outcome.token_ids) == max_new
        expected = peft_ref.generate(ids, adapter, max_new, ignore_eos=True)
        assert outcome.token_ids == expected, (prompt, adapter)
    assert driver.engine.blocks.num_free == driver.engine.blocks.num_blocks


def test_kv_blocks_and_pins_return_after_finish_cancel_timeout_and_preemption(make_driver) -> None:
    # 10 blocks of 16 tokens: the requests below need more than that at once.
    driver = make_driver(block_size=16, kv_cache_bytes=10 * 2 * 2 * 16 * 2 * 16 * 4, max_loaded_adapters=2)
    engine = driver.engine
    assert engine.blocks.num_blocks == 10
    finished = driver.submit(PROMPTS[0], "a1", 6)[1]
    cancelled_seq, cancelled = driver.submit(PROMPTS[1], "org/a2", 100, ignore_eos=True)
    timed_seq, timed = driver.submit(PROMPTS[2], "a3", 100, ignore_eos=True, max_time_seconds=0.05)
    # Three base requests of 4 blocks each cannot fit 10 blocks together: preemption is certain.
    preempted = [driver.submit(PROMPTS[3], "", 60, ignore_eos=True)[1] for _ in range(3)]
    waiting_seq, waiting = driver.submit(PROMPTS[0], "a4", 5)
    steps = 0

    def chaos() -> None:
        nonlocal steps
        steps += 1
        if steps == 3:
            engine.abort(cancelled_seq)
        if steps == 4:
            engine.abort(waiting_seq)
            # Past its deadline whatever the machine's speed (100 tokens never fit in 50 ms, but
            # the test need not rely on that).
            time.sleep(max(0.0, timed_seq.deadline - time.monotonic()) + 0.01)

    driver.run([finished, cancelled, timed, *preempted, waiting], on_step=chaos)
    assert cancelled.finish_reason is FinishReason.CANCELLED
    assert timed.finish_reason is FinishReason.TIME_LIMIT
    assert waiting.finish_reason in (FinishReason.CANCELLED, FinishReason.LENGTH, FinishReason.EOS)
    assert all(o.finish_reason is FinishReason.LENGTH for o in preempted)
    assert engine.scheduler.preemptions > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.in_flight == 0 and not engine.scheduler.has_work()
    for row in engine.adapters.describe():
        assert row.in_flight == 0
    assert engine.adapters.running_pins() == 0


def test_chunked_prefill_does_not_stall_decodes(make_driver) -> None:
    driver = make_driver(max_num_batched_tokens=16)
    engine = driver.engine
    # Resident first: were a1 still being read, the long prompt would wait for it while the short
    # request decodes on, and could finish it before the long prompt's chunks even begin.
    driver.resident("a1")
    short = driver.submit(PROMPTS[0], "", 40, ignore_eos=True)[1]
    while not short.outputs:
        engine.step()
    long_prompt = list(range(10, 130))  # 120 tokens: 8 chunks of at most 15 beside one decode
    long = driver.submit(long_prompt, "a1", 2, ignore_eos=True)[1]
    produced = []
    while not long.outputs:
        before = len(short.token_ids)
        engine.step()
        produced.append(len(short.token_ids) - before)
    assert len(produced) >= 7 and all(n == 1 for n in produced)
    driver.run([short, long])


def test_fair_share_between_a_heavy_and_a_light_tenant(make_driver) -> None:
    driver = make_driver(max_num_seqs=2, max_loaded_adapters=2)
    # Both resident first: otherwise the heavy tenant is served alone for as long as the light
    # tenant's adapter takes to read, which is timing, not fairness.
    driver.resident("a1", "org/a2")
    heavy = [driver.submit(PROMPTS[0], "a1", 6, tenant="heavy", ignore_eos=True)[1] for _ in range(30)]
    light = [driver.submit(PROMPTS[1], "org/a2", 6, tenant="light", ignore_eos=True)[1] for _ in range(3)]
    served = {"heavy": 0, "light": 0}
    light_done_at = None

    def count() -> None:
        nonlocal light_done_at
        served["heavy"] = sum(len(o.token_ids) for o in heavy)
        served["light"] = sum(len(o.token_ids) for o in light)
        if light_done_at is None and all(o.done for o in light):
            light_done_at = dict(served)

    driver.run(heavy + light, on_step=count)
    # Without fairness the light tenant would wait for all 30 heavy requests (180 tokens).
    assert light_done_at is not None
    assert light_done_at["heavy"] <= light_done_at["light"] + 12, light_done_at


def test_seeded_sampling_is_independent_of_the_batch(make_driver) -> None:
    driver = make_driver()
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234, repetition_penalty=1.1)
    alone = driver.generate(PROMPTS[0], "a1", 16, sampling=params, ignore_eos=True).token_ids
    others = [
        driver.submit(p, a, 16, sampling=SamplingParams(temperature=1.0, seed=i), ignore_eos=True)[1]
        for i, (p, a) in enumerate(zip(PROMPTS, ["", "a3", "a1", "org/a2", "a4"]))
    ]
    mine = driver.submit(PROMPTS[0], "a1", 16, sampling=params, ignore_eos=True)[1]
    driver.run([*others, mine])
    assert mine.token_ids == alone
    unseeded = [
        driver.generate(PROMPTS[0], "a1", 16, sampling=SamplingParams(temperature=1.5), ignore_eos=True)
        for _ in range(3)
    ]
    assert len({tuple(o.token_ids) for o in unseeded}) > 1


def test_stop_sequence_and_eos(make_driver) -> None:
    driver = make_driver()
    free = driver.generate(PROMPTS[1], "a1", 30, ignore_eos=True)
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    stopped = driver.generate(PROMPTS[1], "a1", 30, ignore_eos=True, stop_sequences=(stop,))
    assert stopped.finish_reason is FinishReason.STOP_SEQUENCE
    assert stopped.text == text[: text.index(stop)]
    assert stop not in stopped.text
