"""A step that fails part-way ends only the requests it concerns, and leaves nothing held or stuck.

Issue 13 §1: a sampling failure (temperature=1e-40 gave NaN probabilities, torch.multinomial
raised) came after the step had advanced every sequence of the batch; they all stopped, holding
their KV blocks and adapter pins. Here the faults are real values (non-finite logits written into
the real runner's output, hostile sampling parameters) or a real component raising once.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from loraserve.engine import engine as engine_module
from loraserve.engine.engine import Engine
from loraserve.engine.kv_cache import BlockManager
from loraserve.engine.scheduler import Scheduler
from loraserve.engine.sequence import FinishReason, GenerationRequest, SamplingParams, Sequence
from loraserve.errors import InternalError, InvalidArgument, Unavailable
from tests.engine.conftest import Driver, Outcome
from tests.helpers import PROMPTS

VICTIM_ADAPTERS = ["", "a1", "org/a2", "a3"]


def assert_nothing_held(engine: Engine) -> None:
    assert engine.in_flight == 0 and not engine.scheduler.has_work()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    for row in engine.adapters.describe():
        assert row.in_flight == 0, row
    # Pins: each sequence in the running batch holds its adapter's slot.
    assert engine.adapters.running_pins() == 0


def submit_victims(driver: Driver, max_new: int = 12) -> list[tuple[str, str, Outcome]]:
    victims = []
    for i in range(8):
        prompt, adapter = PROMPTS[i % len(PROMPTS)], VICTIM_ADAPTERS[i % len(VICTIM_ADAPTERS)]
        victims.append((prompt, adapter, driver.submit(prompt, adapter, max_new, ignore_eos=True)[1]))
    return victims


def assert_victims_exact(
    driver: Driver, peft_ref, victims: list[tuple[str, str, Outcome]], max_new: int = 12
) -> None:
    for prompt, adapter, outcome in victims:
        assert outcome.finish_reason is FinishReason.LENGTH, (prompt, adapter, outcome.outputs[-1].error)
        ids = driver.tokenizer(prompt)["input_ids"]
        assert outcome.token_ids == peft_ref.generate(ids, adapter, max_new, ignore_eos=True), (
            prompt,
            adapter,
        )


def poison_logits(engine: Engine, monkeypatch, chosen: Callable[[Sequence], bool], value: float) -> None:
    """Wraps the real runner: the logits row of each chosen sequence gets one non-finite value."""
    real_execute = engine.runner.execute

    def execute(batch):
        logits = real_execute(batch).clone()  # [n_sampled, vocab]; clone: an inference-mode tensor
        sampled = [item.seq for item in batch if item.samples]
        for row, seq in enumerate(sampled):
            if chosen(seq):
                logits[row, 5] = value
        return logits

    monkeypatch.setattr(engine.runner, "execute", execute)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_fail_only_their_request(make_driver, peft_ref, monkeypatch, value) -> None:
    driver = make_driver(max_loaded_adapters=4)
    victims = submit_victims(driver)
    sampled_seq, sampled = driver.submit(
        PROMPTS[1], "a1", 12, sampling=SamplingParams(temperature=0.8, seed=1), ignore_eos=True
    )
    greedy_seq, greedy = driver.submit(PROMPTS[2], "org/a2", 12, ignore_eos=True)
    attackers = {sampled_seq.request_id, greedy_seq.request_id}
    # Mid-stream, as from an adapter whose activations overflow after a few tokens.
    poison_logits(
        driver.engine,
        monkeypatch,
        lambda seq: seq.request_id in attackers and len(seq.output_ids) >= 2,
        value,
    )
    driver.run([o for _, _, o in victims] + [sampled, greedy])
    for outcome in (sampled, greedy):
        assert outcome.finish_reason is FinishReason.ERROR
        assert isinstance(outcome.outputs[-1].error, InternalError)
        assert "non-finite logits" in outcome.outputs[-1].error.message
        assert len(outcome.token_ids) == 2
    assert_victims_exact(driver, peft_ref, victims)
    assert_nothing_held(driver.engine)


def test_hostile_sampling_parameters_given_straight_to_the_engine(make_driver, peft_ref) -> None:
    # Past request validation (the engine is a library too): tiny temperature and penalty must
    # not reach torch.multinomial as NaN; a NaN temperature fails its own request only.
    driver = make_driver(max_loaded_adapters=4)
    victims = submit_victims(driver)
    tiny_temperature = driver.submit(
        PROMPTS[0], "a3", 12, sampling=SamplingParams(temperature=1e-40, seed=3), ignore_eos=True
    )[1]
    tiny_penalty = driver.submit(
        PROMPTS[1],
        "a1",
        12,
        sampling=SamplingParams(temperature=1.0, repetition_penalty=1e-38, seed=4),
        ignore_eos=True,
    )[1]
    nan_temperature = driver.submit(
        PROMPTS[2], "", 12, sampling=SamplingParams(temperature=float("nan"), seed=5), ignore_eos=True
    )[1]
    driver.run([o for _, _, o in victims] + [tiny_temperature, tiny_penalty, nan_temperature])
    ids = driver.tokenizer(PROMPTS[0])["input_ids"]
    assert tiny_temperature.token_ids == peft_ref.generate(ids, "a3", 12, ignore_eos=True)  # greedy
    assert tiny_penalty.finish_reason is FinishReason.LENGTH and len(tiny_penalty.token_ids) == 12
    assert nan_temperature.finish_reason is FinishReason.ERROR
    error = nan_temperature.outputs[-1].error
    assert isinstance(error, InvalidArgument) and "temperature=nan" in error.message
    assert_victims_exact(driver, peft_ref, victims)
    assert_nothing_held(driver.engine)


def test_sampler_raising_fails_the_sampling_rows_and_prompt_chunks_go_on(
    make_driver, peft_ref, monkeypatch
) -> None:
    # A 16-token budget: the long prompt runs in chunks while the short requests sample.
    driver = make_driver(max_num_batched_tokens=16)
    engine = driver.engine
    # Resident first, so that the steps below do what they say whatever the reader threads' speed:
    # with a1 still being read, the base request could finish before the a1 one sampled at all.
    driver.resident("a1", "a3")
    short = [driver.submit(p, a, 6, ignore_eos=True)[1] for p, a in zip(PROMPTS[:2], ["", "a1"])]
    while not all(o.outputs for o in short):
        engine.step()
    long_prompt = list(range(10, 70))
    long_seq, long = driver.submit(long_prompt, "a3", 4, ignore_eos=True)
    real_sample = engine_module.sample
    calls = []

    def sample_once_broken(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected sampler fault")
        return real_sample(*args)

    monkeypatch.setattr(engine_module, "sample", sample_once_broken)
    engine.step()  # the decodes sample (and fail); a chunk of the long prompt advances
    assert all(o.finish_reason is FinishReason.ERROR for o in short)
    assert all(isinstance(o.outputs[-1].error, InternalError) for o in short)
    assert not long.outputs and long_seq.num_computed > 0  # its first chunk went through
    driver.run([long])
    assert long.token_ids == peft_ref.generate(long_prompt, "a3", 4, ignore_eos=True)
    assert_nothing_held(engine)


def test_scheduler_raising_ends_what_it_holds_and_the_engine_keeps_serving(make_driver, monkeypatch) -> None:
    driver = make_driver()
    engine = driver.engine
    held = [driver.submit(p, a, 20, ignore_eos=True)[1] for p, a in zip(PROMPTS[:3], ["", "a1", "org/a2"])]
    engine.step()
    real_schedule = engine.scheduler.schedule
    calls = []

    def schedule_once_broken():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected scheduler fault")
        return real_schedule()

    monkeypatch.setattr(engine.scheduler, "schedule", schedule_once_broken)
    engine.step()
    assert all(o.finish_reason is FinishReason.ERROR for o in held)
    assert all(isinstance(o.outputs[-1].error, InternalError) for o in held)
    assert_nothing_held(engine)
    later = driver.generate(PROMPTS[3], "a1", 4, ignore_eos=True)
    assert later.finish_reason is FinishReason.LENGTH and len(later.token_ids) == 4
    assert_nothing_held(engine)


def test_a_sequence_with_nothing_to_compute_is_failed_not_skipped() -> None:
    # The state the old step left behind: num_computed advanced, no token appended.
    scheduler = Scheduler(BlockManager(8, 4), None, max_num_seqs=4, max_num_batched_tokens=32)
    seqs = [
        Sequence(GenerationRequest(f"r{i}", [1, 2, 3, 4, 5]), None, lambda o: None, None, None)
        for i in range(2)
    ]
    for seq in seqs:
        scheduler.add(seq)
    batch, failed = scheduler.schedule()
    assert [item.seq for item in batch] == seqs and not failed
    stuck = seqs[0]
    stuck.num_computed = stuck.num_tokens
    seqs[1].num_computed = seqs[1].num_tokens - 1  # a healthy decode
    batch, failed = scheduler.schedule()
    assert [item.seq for item in batch] == [seqs[1]]
    assert [seq for seq, _ in failed] == [stuck]
    assert isinstance(failed[0][1], InternalError) and "no token left to compute" in failed[0][1].message


def test_a_request_after_shutdown_is_refused_and_nothing_stays_counted(make_driver) -> None:
    driver = make_driver()
    running = driver.submit(PROMPTS[0], "a1", 50, ignore_eos=True)[1]
    driver.engine.step()
    driver.engine.shutdown()
    assert running.finish_reason is FinishReason.ERROR
    assert isinstance(running.outputs[-1].error, Unavailable)
    with pytest.raises(Unavailable):
        driver.submit(PROMPTS[1], "", 4)
    assert_nothing_held(driver.engine)
