"""The adapter manager's seams on a real slot table: states, failures as data, re-reads, no disk I/O
on the caller's thread, the symlink swap race made deterministic with the reader's hook."""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time

import pytest
import torch

from loraserve.adapters.layer import SlotTable
from loraserve.adapters.manager import AdapterManager, AdapterState
from loraserve.adapters.store import AdapterStore
from loraserve.errors import FailedPrecondition, NotFound, Unavailable
from loraserve.model_loader import load_base_model

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def make_manager(store_copy):
    managers = []

    def make(num_slots: int = 2, max_host_bytes: int = 1 << 30) -> AdapterManager:
        # A fresh slot table each time: attaching wraps the layers of a fresh model copy.
        model = load_base_model(str(store_copy.base), "none", "cpu", "float32").model
        slots = SlotTable.attach(model, num_slots, 16, torch.float32, torch.device("cpu"))
        manager = AdapterManager(AdapterStore(store_copy.store), slots, max_host_bytes)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.shutdown()


def _wait(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the adapter reader"
        time.sleep(0.005)


def _place(manager: AdapterManager, entry) -> int:
    """What the engine's scheduler does: try to place until the reader has published."""
    result: list[int] = []
    _wait(lambda: result.append(manager.try_place(entry)) or result[-1] is not None)
    return result[-1]


def test_states_through_a_load_and_frozen_rows(make_manager) -> None:
    manager = make_manager()
    entry = manager.acquire("a1")
    assert entry.state in (AdapterState.READING, AdapterState.HOST)
    slot = _place(manager, entry)
    assert entry.state is AdapterState.DEVICE and entry.slot == slot
    row = manager.describe_one("a1")
    assert (row.tier, row.rank, row.in_flight, row.slot) == ("device", 8, 1, slot)
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.rank = 3
    manager.release(entry)
    info = manager.unload("a1")
    assert info.adapter_id == "a1" and entry.state is AdapterState.RETIRED
    assert manager.describe() == []


def test_a_failure_is_raised_fresh_each_time(make_manager, store_copy) -> None:
    (store_copy.adapter("a1") / WEIGHTS).write_bytes(b"not safetensors")
    manager = make_manager()
    errors = []
    for _ in range(20):
        entry = manager.acquire("a1")
        with pytest.raises(FailedPrecondition, match="not a valid safetensors file") as caught:
            _place(manager, entry)
        manager.release(entry)
        errors.append(caught.value)
    assert len({id(e) for e in errors}) == len(errors)  # never the same object re-raised
    depth = [len(list(_frames(e.__traceback__))) for e in errors]
    assert depth[-1] == depth[1], depth  # the traceback does not grow with every raise
    assert manager.describe() == []  # a refused adapter holds no entry


def _frames(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def test_unknown_ids_leave_nothing_behind(make_manager) -> None:
    manager = make_manager()
    for i in range(50):
        entry = manager.acquire(f"nobody-{i}")
        with pytest.raises(NotFound, match="not found in the adapter store"):
            _place(manager, entry)
        manager.release(entry)
    assert manager.describe() == []
    assert len(manager._registry._failures) == 0  # only failures of real files are remembered


def test_files_are_only_touched_on_reader_threads(make_manager) -> None:
    manager = make_manager()
    threads: list[str] = []
    manager.reader.before_open = lambda adapter_id: threads.append(threading.current_thread().name)
    entry = manager.acquire("a3")
    _place(manager, entry)
    future = manager.load("org/a2")
    _wait(lambda: manager.housekeeping() or future.done())
    assert future.result().adapter.tier == "device" and not future.result().reloaded
    assert threads and all(name.startswith("adapter-load") for name in threads), threads


def test_a_reread_must_find_the_files_first_loaded(make_manager, store_copy) -> None:
    """An adapter dropped from host memory and then from its slot, while a request still waits on
    it, is read again: the files must be the ones validated at first load."""
    manager = make_manager(num_slots=1, max_host_bytes=0)
    first = manager.acquire("a1")
    _place(manager, first)
    manager.release(first)
    other = manager.acquire("a6")  # read: the host budget of 0 drops a1's host copy
    _wait(lambda: other.state is AdapterState.HOST)
    assert first.weights is None and first.state is AdapterState.DEVICE
    again = manager.acquire("a1")
    assert again is first
    _place(manager, other)  # takes a1's only slot: a1 is now on disk only, with a request waiting
    assert first.state is AdapterState.DISK and first.fingerprint is not None
    shutil.copyfile(store_copy.adapter("a5") / WEIGHTS, store_copy.adapter("a1") / WEIGHTS)
    manager.release(other)
    with pytest.raises(Unavailable, match="changed on disk since it was loaded"):
        _place(manager, first)
    manager.release(first)
    # A new request is a new version: it reads the new files (which now disagree with the config).
    entry = manager.acquire("a1")
    with pytest.raises(FailedPrecondition, match="rank 16 in the weights but 8"):
        _place(manager, entry)


def test_the_symlink_swap_race_serves_nothing_from_outside(make_manager, store_copy, tmp_path) -> None:
    """The request is accepted while a1 is a real folder; the folder is swapped for a link to an
    outside adapter right before the reader opens it (the window issue 13 §4 exploited)."""
    outside = tmp_path / "outside"
    shutil.copytree(store_copy.adapter("a5"), outside)
    manager = make_manager()

    def swap(adapter_id: str) -> None:
        folder = store_copy.adapter(adapter_id)
        folder.rename(tmp_path / "old")
        os.symlink(outside, folder)

    manager.reader.before_open = swap
    entry = manager.acquire("a1")
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        _place(manager, entry)
    assert entry.weights is None and entry.state is AdapterState.FAILED
    assert manager.slots.rank_of_slot == [0, 0]  # nothing from outside reached a slot


def test_admin_load_reloads_changed_files(make_manager, store_copy) -> None:
    manager = make_manager()

    def load(adapter_id: str):
        future = manager.load(adapter_id)
        _wait(lambda: manager.housekeeping() or future.done())
        return future.result()

    assert not load("a1").reloaded
    assert load("a1").adapter.rank == 8
    shutil.rmtree(store_copy.adapter("a1"))
    shutil.copytree(store_copy.adapter("a6"), store_copy.adapter("a1"))
    result = load("a1")
    assert result.reloaded and result.adapter.rank == 3 and result.adapter.tier == "device"
