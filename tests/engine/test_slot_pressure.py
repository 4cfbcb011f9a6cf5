"""Many adapters over few slots: budgeted slot sizing, prefetch, eviction by what the queue needs
next, and the bound on how long a cold adapter's request can be passed over."""

from __future__ import annotations

import threading
import time

import torch

from loraserve.adapters.registry import AdapterEntry
from loraserve.adapters.slot_allocator import SlotAllocator
from loraserve.adapters.slot_sizing import MAX_AUTO_SLOTS, bytes_per_slot, slot_count
from loraserve.config import ServerConfig
from loraserve.engine.engine import EngineConfig
from loraserve.engine.scheduler import MAX_PASS_OVERS
from loraserve.engine.sequence import Status
from tests.engine.conftest import Outcome


def _wait_until_read(entry: AdapterEntry, timeout: float = 120.0) -> None:
    """Waits (without stepping the engine) for a reader thread to bring the adapter to host memory."""
    deadline = time.monotonic() + timeout
    while entry.tier == "disk":
        assert time.monotonic() < deadline, f"adapter {entry.adapter_id} was not read"
        time.sleep(0.005)


# ---------------------------------------------------------------- budgeted slot sizing
def test_slot_count_from_a_byte_budget() -> None:
    shapes = {"q": (64, 64), "v": (64, 32)}
    per_slot = bytes_per_slot(shapes, 8, torch.float32)
    assert per_slot == 8 * (128 + 96) * 4
    assert slot_count("auto", per_slot, 10 * per_slot + per_slot // 2) == 10
    assert slot_count("auto", per_slot, per_slot // 2) == 1  # always one slot
    assert slot_count("auto", per_slot, 10**15) == MAX_AUTO_SLOTS
    assert slot_count(6, per_slot, 0) == 6  # a number is taken as it is
    assert bytes_per_slot(shapes, 8, torch.bfloat16) == per_slot // 2


def test_auto_is_the_default_and_a_number_still_works() -> None:
    assert ServerConfig.model_fields["max_loaded_adapters"].default == "auto"
    assert EngineConfig().max_loaded_adapters == "auto"
    assert ServerConfig(max_loaded_adapters="12").max_loaded_adapters == 12
    assert ServerConfig(max_loaded_adapters="auto").max_loaded_adapters == "auto"


def test_engine_sizes_its_slots_by_the_adapter_memory_budget(make_driver) -> None:
    probe = make_driver(max_loaded_adapters=1)
    per_slot = probe.engine.slots.bytes_per_slot
    driver = make_driver(max_loaded_adapters="auto", adapter_memory_bytes=37 * per_slot + 5)
    assert driver.engine.slots.num_slots == 37
    assert driver.generate("hello world", "a1").finish_reason is not None


def test_the_default_holds_hundreds_of_small_adapters(make_driver) -> None:
    """Default settings (a fraction of free memory) on a machine with room: hundreds of slots."""
    driver = make_driver(max_loaded_adapters="auto")
    assert driver.engine.slots.num_slots >= 256


# ---------------------------------------------------------------- eviction choice
def test_victim_spares_adapters_the_queue_needs() -> None:
    allocator = SlotAllocator(3)
    oldest, middle, newest = (AdapterEntry(f"a{i}", lru_tick=i) for i in range(3))
    for slot, entry in enumerate((oldest, middle, newest)):
        allocator.assign(slot, entry)
    assert allocator.victim() is oldest  # nothing queued: least recently used
    assert allocator.victim({oldest: 0}) is middle  # the oldest is needed: the next unneeded one
    needed = {oldest: 0, middle: 5, newest: 2}
    assert allocator.victim(needed, allow_needed=False) is None
    assert allocator.victim(needed) is middle  # all needed: the one needed last
    middle.running = 1
    assert allocator.victim(needed) is newest  # a running adapter is never a victim


def test_no_eviction_of_an_adapter_a_queued_request_needs(make_driver) -> None:
    """Slots [a1, a4], a1 least recently used; queued: a request on a6 (cold) and one on a1. The
    cold adapter takes a4's slot, not a1's, though a1 is the older."""
    driver = make_driver(max_loaded_adapters=2, max_num_seqs=1)
    driver.generate("hello world", "a1")
    driver.generate("hello world", "a4")
    manager = driver.engine.adapters
    a1 = manager._registry.get("a1")
    assert a1.tier == "device" and manager._registry.get("a4").tier == "device"
    blocker, blocking = driver.submit("the quick brown fox", "", max_new_tokens=200, ignore_eos=True)
    driver.engine.step()  # the base-model request holds the only running seat
    cold, cold_done = driver.submit("hello world", "a6")
    waiting, waiting_done = driver.submit("hello world", "a1")
    _wait_until_read(cold.adapter)
    driver.engine.step()
    assert cold.adapter.tier == "device" and a1.tier == "device"
    assert manager.describe_one("a4").tier != "device"
    assert cold.status is Status.WAITING and waiting.status is Status.WAITING
    driver.engine.abort(blocker)
    driver.run([blocking, cold_done, waiting_done])
    assert cold_done.finish_reason is not None and waiting_done.finish_reason is not None


# ---------------------------------------------------------------- prefetch
def test_a_queued_cold_adapter_is_resident_before_its_first_step(make_driver) -> None:
    driver = make_driver(max_loaded_adapters=4, max_num_seqs=1)
    running, running_done = driver.submit("the quick brown fox", "", max_new_tokens=200, ignore_eos=True)
    driver.engine.step()
    assert running.status is Status.RUNNING
    # The reader is held at the files' opening, so that the check below sees the adapter on disk
    # however fast the reader thread would otherwise be.
    reading, release = threading.Event(), threading.Event()

    def hold(adapter_id: str) -> None:
        if adapter_id == "a5":
            reading.set()
            release.wait(120)

    driver.engine.adapters.reader.before_open = hold
    try:
        queued, queued_done = driver.submit("hello world", "a5")
        assert reading.wait(120)  # its read started on a reader thread at submit, without a step
        assert queued.adapter.tier == "disk"
    finally:
        release.set()
        driver.engine.adapters.reader.before_open = None
    _wait_until_read(queued.adapter)
    steps = driver.engine.steps
    driver.engine.step()  # the running request's step: the queued adapter is staged after scheduling
    assert driver.engine.steps == steps + 1
    assert queued.adapter.tier == "device" and queued.status is Status.WAITING
    assert queued.first_scheduled is None  # it has not run: it will find its adapter resident
    driver.engine.abort(running)
    driver.run([running_done, queued_done])
    assert queued_done.finish_reason is not None and len(queued_done.token_ids) > 0


# ---------------------------------------------------------------- fairness under slot pressure
def test_a_cold_adapter_is_passed_over_a_bounded_number_of_times(make_driver) -> None:
    """Two slots held by two hot adapters with long queues; a request on a third adapter waits in
    host memory. Resident requests go first (no thrash), but the cold one is admitted after at
    most MAX_PASS_OVERS of them, long before the hot queues drain."""
    driver = make_driver(max_loaded_adapters=2, max_num_seqs=2)
    driver.generate("hello world", "a1")
    driver.generate("hello world", "a4")
    hot: list[Outcome] = []
    order: list[str] = []
    for _ in range(3 * MAX_PASS_OVERS):
        for adapter in ("a1", "a4"):
            hot.append(driver.submit("hello world", adapter, max_new_tokens=4, ignore_eos=True)[1])
    cold, cold_done = driver.submit("the quick brown fox", "a6", max_new_tokens=4, ignore_eos=True)
    _wait_until_read(cold.adapter)
    scheduler = driver.engine.scheduler
    admitted_before_cold = 0
    while cold.first_scheduled is None:
        running = {id(s) for s in scheduler.running}
        assert driver.engine.step()
        if cold.first_scheduled is None:
            admitted_before_cold += sum(1 for s in scheduler.running if id(s) not in running)
        order.append("step")
    assert 0 < scheduler.max_passed_over <= MAX_PASS_OVERS
    assert admitted_before_cold <= MAX_PASS_OVERS + 2 * driver.engine.config.max_num_seqs
    assert sum(1 for o in hot if not o.done) > len(hot) // 2  # the hot queues were far from drained
    driver.run([*hot, cold_done])
    assert all(o.finish_reason is not None for o in [*hot, cold_done])
