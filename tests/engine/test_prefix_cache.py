"""Prefix caching: blocks keyed by adapter and load, shared and evicted right, outputs unchanged."""

from __future__ import annotations

import random
import shutil
import time

import pytest

from loraserve.engine.kv_cache import BlockKey, BlockManager
from loraserve.engine.prefix_cache import adapter_seed, base_seed, chain
from tests.helpers import TOY_ADAPTERS

ADAPTERS = ["", "a1", "org/a2", "a3", "a5"]
SYSTEM = list(range(20, 68))  # a 48-token "system prompt": three blocks of 16
LONG = list(range(150, 246))  # 96 tokens


def _prompt(rng: random.Random, system: list[int] = SYSTEM) -> list[int]:
    return system + [rng.randint(10, 300) for _ in range(rng.randint(1, 20))]


def _cached(outcome) -> int:
    return outcome.outputs[-1].cached_prompt_tokens


def _assert_nothing_held(engine) -> None:
    blocks = engine.blocks
    assert blocks.num_held == 0 and blocks.num_free == blocks.num_blocks
    assert all(refs == 0 for refs in blocks._refs)
    assert engine.in_flight == 0 and not engine.scheduler.has_work()


# ---------------------------------------------------------------------------- block bookkeeping
def test_blocks_are_shared_cached_oldest_first_and_evicted_after_free_ones() -> None:
    blocks = BlockManager(num_blocks=4, block_size=2)
    a: list[int] = []
    blocks.grow(a, 4)  # two blocks
    keys = [BlockKey(bytes([i]) * 16, (i, i), "x") for i in range(2)]
    for block, key in zip(a, keys):
        blocks.publish(block, key)
    b: list[int] = []
    hits = [blocks.lookup(k.hash, k.tokens) for k in keys]
    assert hits == a and blocks.can_take(hits, 6)
    blocks.take(b, hits)
    blocks.grow(b, 6)
    assert blocks._refs[a[0]] == 2 and blocks.num_free == 1
    blocks.release(a)
    assert blocks.num_cached == 0 and blocks.num_free == 1  # b still holds them
    blocks.release(b)
    assert blocks.num_cached == 2 and blocks.num_free == 4 and blocks.num_held == 0
    # Free blocks first, then the oldest cached: the second block (released first) goes before the first.
    c: list[int] = []
    blocks.grow(c, 6)
    assert blocks.evictions == 1 and blocks.lookup(keys[1].hash, keys[1].tokens) is None
    assert blocks.lookup(keys[0].hash, keys[0].tokens) == hits[0]
    blocks.grow(c, 8)
    assert blocks.evictions == 2 and blocks.num_cached == 0
    blocks.release(c)
    assert blocks.num_free == 4


def test_a_hash_hit_with_other_tokens_is_a_miss() -> None:
    blocks = BlockManager(num_blocks=2, block_size=2)
    table: list[int] = []
    blocks.grow(table, 2)
    blocks.publish(table[0], BlockKey(b"h" * 16, (1, 2), ""))
    assert blocks.lookup(b"h" * 16, (1, 2)) == table[0]
    assert blocks.lookup(b"h" * 16, (1, 3)) is None  # a collision never serves another prefix


def test_forget_drops_one_owners_blocks_first() -> None:
    blocks = BlockManager(num_blocks=3, block_size=1)
    held: list[int] = []
    blocks.grow(held, 3)
    for block, owner in zip(held, ["a", "b", "a"]):
        blocks.publish(block, BlockKey(bytes([block]) * 16, (block,), owner))
    keep = [held.pop()]  # still held by a sequence when "a" goes
    blocks.release(held)
    assert blocks.forget(["a"]) == 1 and blocks.num_cached == 1
    assert blocks.lookup(bytes([keep[0]]) * 16, (keep[0],)) is None
    blocks.release(keep)
    assert blocks.num_cached == 1  # freed, not cached: its key is gone


def test_seeds_separate_base_adapters_versions_and_tenants(toy) -> None:
    from loraserve.adapters.registry import AdapterEntry
    from loraserve.adapters.store import Fingerprint

    def entry(adapter_id: str, files: int, generation: int) -> AdapterEntry:
        return AdapterEntry(
            adapter_id, fingerprint=Fingerprint((files,), (files,)), load_generation=generation
        )

    seeds = [
        base_seed("m", ""),
        base_seed("m", "acme"),
        adapter_seed(entry("a", 1, 0), ""),
        adapter_seed(entry("a", 1, 0), "acme"),
        adapter_seed(entry("a", 2, 0), ""),  # reloaded: other files
        adapter_seed(entry("a", 1, 1), ""),  # unloaded and loaded again: same files, next generation
        adapter_seed(entry("b", 1, 0), ""),
        base_seed("m", "", layout=1),  # the base weights' numerics changed (a training job)
        adapter_seed(entry("a", 1, 0), "", layout=1),
    ]
    assert len(set(seeds)) == len(seeds)
    assert adapter_seed(AdapterEntry("a"), "") is None  # not read yet: not cacheable
    assert chain(seeds[0], [1, 2]) != chain(seeds[2], [1, 2]) != chain(seeds[2], [2, 1])


# ---------------------------------------------------------------------------- engine
def _run_twice(driver, jobs: list[tuple[list[int], str, int]]) -> tuple[list, list]:
    """Each job twice (a second turn resends it): all first, then all again."""
    first = [driver.submit(ids, adapter, n, ignore_eos=True)[1] for ids, adapter, n in jobs]
    driver.run(first)
    second = [driver.submit(ids, adapter, n, ignore_eos=True)[1] for ids, adapter, n in jobs]
    driver.run(second)
    return first, second


@pytest.mark.parametrize(
    ("shape", "system"),
    [
        ({"max_num_batched_tokens": 16}, SYSTEM),  # chunked prefill: prompts span several steps
        # 14 blocks of 4 tokens: two running requests outgrow it, so the newer one is preempted.
        ({"block_size": 4, "kv_cache_bytes": 14 * 2 * 2 * 4 * 2 * 16 * 4, "max_num_seqs": 4}, SYSTEM[:16]),
    ],
    ids=["chunked", "preemption"],
)
def test_greedy_outputs_are_the_same_with_the_cache_on_and_off(make_driver, peft_ref, shape, system) -> None:
    rng = random.Random(7)
    jobs = [
        (_prompt(rng, system)[: len(system) + 12], ADAPTERS[i % len(ADAPTERS)], rng.randint(4, 10))
        for i in range(12)
    ]
    on = make_driver(max_loaded_adapters=5, **shape)
    off = make_driver(max_loaded_adapters=5, enable_prefix_caching=False, **shape)
    # Resident first: which requests run together (and so whether they outgrow the pool) must
    # not depend on when the reader threads finish.
    for driver in (on, off):
        driver.resident(*ADAPTERS[1:])
    on_runs, off_runs = _run_twice(on, jobs), _run_twice(off, jobs)
    for turn in range(2):
        for (ids, adapter, n), got, ref in zip(jobs, on_runs[turn], off_runs[turn]):
            assert got.token_ids == ref.token_ids == peft_ref.generate(ids, adapter, n, ignore_eos=True)
            assert _cached(ref) == 0
    if "max_num_seqs" in shape:
        assert on.engine.scheduler.preemptions > 0 and off.engine.scheduler.preemptions > 0
        assert sum(_cached(got) for got in on_runs[1]) > 0
    else:
        # The second turn hit the cache: every prompt's full blocks but the one holding its last token.
        for (ids, _, _), got in zip(jobs, on_runs[1]):
            assert _cached(got) == (len(ids) - 1) // 16 * 16 > 0
    _assert_nothing_held(on.engine)
    _assert_nothing_held(off.engine)


def test_no_cross_hits_between_adapters_and_the_base(make_driver, peft_ref) -> None:
    driver = make_driver(max_loaded_adapters=2)
    ids = [*SYSTEM, 90, 91, 92]
    order = ["a1", "org/a2", "", "a1", "org/a2", ""]
    outcomes = [driver.generate(ids, adapter, 6, ignore_eos=True) for adapter in order]
    assert [_cached(o) for o in outcomes] == [0, 0, 0, 48, 48, 48]
    for adapter, outcome in zip(order, outcomes):
        assert outcome.token_ids == peft_ref.generate(ids, adapter, 6, ignore_eos=True)


def test_tenants_do_not_share_blocks(make_driver) -> None:
    driver = make_driver()
    ids = [*SYSTEM, 90]
    assert _cached(driver.generate(ids, "a1", 2, tenant="acme")) == 0
    assert _cached(driver.generate(ids, "a1", 2, tenant="globex")) == 0
    assert _cached(driver.generate(ids, "a1", 2, tenant="acme")) == 48


def _step_until(engine, done, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        if not engine.step():
            time.sleep(0.001)


def test_reload_with_changed_weights_and_unload_make_blocks_unreachable(make_driver, store_copy, peft_ref):
    driver = make_driver(adapters_dir=store_copy.store)
    engine = driver.engine
    ids = [*SYSTEM, 90, 91]
    assert driver.generate(ids, "a1", 6, ignore_eos=True).token_ids == peft_ref.generate(ids, "a1", 6, True)
    warm = driver.generate(ids, "a1", 6, ignore_eos=True)
    assert _cached(warm) == 48 and engine.blocks.num_cached > 0

    # Reload with other weights (a6's files under the id a1): no hits, PEFT's output on the new weights.
    shutil.rmtree(store_copy.adapter("a1"))
    shutil.copytree(store_copy.adapter("a6"), store_copy.adapter("a1"))
    future = engine.adapters.load("a1")
    _step_until(engine, future.done)
    assert future.result().reloaded
    engine.step()  # the next step drops the old version's blocks
    assert engine.blocks.num_cached == 0
    reloaded = driver.generate(ids, "a1", 6, ignore_eos=True)
    assert _cached(reloaded) == 0
    assert reloaded.token_ids == peft_ref.generate(ids, "a6", 6, ignore_eos=True)
    assert _cached(driver.generate(ids, "a1", 6, ignore_eos=True)) == 48

    # Unload, then use it again with unchanged files: a new load generation, so still no hits.
    engine.adapters.unload("a1")
    engine.step()
    assert engine.blocks.num_cached == 0
    again = driver.generate(ids, "a1", 6, ignore_eos=True)
    assert _cached(again) == 0 and again.token_ids == reloaded.token_ids
    _assert_nothing_held(engine)


def test_eviction_under_memory_pressure_leaks_nothing(make_driver, peft_ref) -> None:
    # 16 blocks of 4 tokens; 40 prompts of ~20-60 tokens on five adapters overflow it many times.
    driver = make_driver(block_size=4, kv_cache_bytes=16 * 2 * 2 * 4 * 2 * 16 * 4, max_num_seqs=4)
    engine = driver.engine
    assert engine.blocks.num_blocks == 16
    driver.resident(*ADAPTERS[1:])  # the order the groups run in is then the scheduler's alone
    rng = random.Random(3)
    systems = [[rng.randint(10, 300) for _ in range(rng.randint(12, 24))] for _ in range(5)]
    # Groups of 8 on one (system prompt, adapter): the later ones of a group find the earlier ones' blocks.
    jobs = [(_prompt(rng, systems[i // 8])[:40], ADAPTERS[i // 8], 6) for i in range(40)]
    outcomes = [driver.submit(ids, adapter, n, ignore_eos=True)[1] for ids, adapter, n in jobs]
    driver.run(outcomes)
    assert engine.blocks.evictions > 0
    assert sum(_cached(o) for o in outcomes) > 0
    for (ids, adapter, n), outcome in zip(jobs, outcomes):
        assert outcome.token_ids == peft_ref.generate(ids, adapter, n, ignore_eos=True)
    _assert_nothing_held(engine)  # every block free or cached, no reference left


def test_same_prefix_arriving_together_is_right_either_way(make_driver, peft_ref) -> None:
    # Admitted in the same step: both compute the prefix (the second copy stays private).
    # a3 and a5 resident first: were an adapter read to finish between the scheduler's looks at
    # two queued requests, the later one could be admitted a step ahead of the earlier.
    driver = make_driver()
    driver.resident("a3")
    prefix = SYSTEM + list(range(100, 148))  # 96 tokens
    a, b = [*prefix, 7, 8], [*prefix, 9]
    together = [driver.submit(a, "a3", 6, ignore_eos=True)[1], driver.submit(b, "a3", 6, ignore_eos=True)[1]]
    driver.run(together)
    assert [_cached(o) for o in together] == [0, 0]
    _assert_nothing_held(driver.engine)
    # Chunks of 24 tokens: the second waits while the first's prefill fills blocks, then shares them.
    driver = make_driver(max_num_batched_tokens=24)
    engine = driver.engine
    driver.resident("a5")
    first = driver.submit([*LONG, 5], "a5", 6, ignore_eos=True)[1]
    engine.step()
    second = driver.submit([*LONG, 6], "a5", 6, ignore_eos=True)[1]
    driver.run([first, second])
    assert _cached(first) == 0 and _cached(second) == 96
    cases = [(a, "a3", together[0]), (b, "a3", together[1])]
    cases += [([*LONG, 5], "a5", first), ([*LONG, 6], "a5", second)]
    for ids, adapter, outcome in cases:
        assert outcome.token_ids == peft_ref.generate(ids, adapter, 6, ignore_eos=True)
    _assert_nothing_held(engine)


def test_aborted_and_preempted_sequences_release_their_references(make_driver) -> None:
    driver = make_driver(max_num_batched_tokens=16)
    engine = driver.engine
    ids = SYSTEM + list(range(100, 140))
    driver.generate(ids, "a1", 2)
    seq, outcome = driver.submit([*ids, 1], "a1", 50, ignore_eos=True)
    engine.step()
    assert _held_by(engine, seq) and engine.blocks.num_held > 0
    engine.scheduler.preempt(seq)
    assert engine.blocks.num_held == 0
    engine.step()
    engine.abort(seq)
    driver.run([outcome])
    _assert_nothing_held(engine)
    assert engine.blocks.num_cached > 0


def _held_by(engine, seq) -> bool:
    return bool(seq.block_table) and all(engine.blocks._refs[b] >= 1 for b in seq.block_table)


assert set(ADAPTERS[1:]) <= set(TOY_ADAPTERS)
