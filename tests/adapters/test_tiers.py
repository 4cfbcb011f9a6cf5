"""Tiers through a real server: slot rotation, pins, drains, hot-added and reloaded adapters."""

from __future__ import annotations

import shutil
import threading

import pytest

from loraserve_client import AdapterNotFound, AdapterRejected, Client, InvalidRequest
from tests.helpers import PROMPTS, TOY_ADAPTERS, ServerThread

MAX_NEW = 8


@pytest.fixture
def tier_server(store_copy):
    with ServerThread(
        model=str(store_copy.base),
        adapters_dir=store_copy.store,
        max_loaded_adapters=2,
        max_host_adapter_bytes=150_000,
        kv_cache_bytes=4 << 20,
    ) as srv:
        srv.store = store_copy.store
        with Client(srv.target, timeout=60) as client:
            srv.client = client
            yield srv


def _expected(peft_ref, prompt: str, adapter: str) -> list[int]:
    return peft_ref.generate(peft_ref.tokenizer(prompt)["input_ids"], adapter, MAX_NEW)


def _states(client: Client) -> dict[str, tuple[str, int]]:
    return {a.adapter_id: (a.state, a.slot) for a in client.list_adapters()}


def test_rotation_through_two_slots_and_a_small_host_tier(tier_server, peft_ref) -> None:
    client = tier_server.client
    for _ in range(2):
        for adapter in TOY_ADAPTERS:
            got = client.generate(PROMPTS[0], adapter, max_new_tokens=MAX_NEW).token_ids
            assert got == _expected(peft_ref, PROMPTS[0], adapter), adapter
    metrics = tier_server.metrics
    assert metrics.adapter_evictions.labels("device")._value.get() >= 8
    assert metrics.adapter_evictions.labels("host")._value.get() >= 1
    on_device = [a for a in client.list_adapters() if a.state == "device"]
    assert len(on_device) == 2


def test_pinned_adapter_is_never_evicted(tier_server, peft_ref) -> None:
    client = tier_server.client
    loaded = client.load_adapter("a5", pin=True)
    assert loaded.adapter.state == "device" and loaded.adapter.pinned
    slot = loaded.adapter.slot
    for adapter in TOY_ADAPTERS:
        if adapter == "a5":
            continue
        assert client.generate(PROMPTS[1], adapter, max_new_tokens=MAX_NEW).token_ids == _expected(
            peft_ref, PROMPTS[1], adapter
        )
        assert _states(client)["a5"] == ("device", slot)
    assert client.generate(PROMPTS[1], "a5", max_new_tokens=MAX_NEW).token_ids == _expected(
        peft_ref, PROMPTS[1], "a5"
    )
    with pytest.raises(Exception, match="pinned"):
        client.load_adapter("a1", pin=True)  # the last free slot cannot be pinned too


def test_unload_during_an_inflight_request_lets_it_finish(tier_server, monkeypatch) -> None:
    client = tier_server.client
    # Once the stream has a token, the engine's next step waits for the unload: the request is
    # still in flight then, however fast the engine runs through its 150 tokens.
    unloaded = threading.Event()
    real_execute = tier_server.engine.runner.execute

    def execute(batch):
        if any(item.seq.output_ids for item in batch):
            unloaded.wait(120)
        return real_execute(batch)

    monkeypatch.setattr(tier_server.engine.runner, "execute", execute)
    stream = client.generate_stream(PROMPTS[2], "a3", max_new_tokens=150, ignore_eos=True)
    try:
        first = next(stream)
        info = client.unload_adapter("a3")
        assert info.draining and info.in_flight_requests == 1
        with pytest.raises(AdapterNotFound, match="being unloaded"):
            client.generate(PROMPTS[2], "a3", max_new_tokens=4)
    finally:
        unloaded.set()
    rest = list(stream)
    tokens = len(first.token_ids) + sum(len(c.token_ids) for c in rest)
    assert tokens == 150 and rest[-1].finish_reason == "length"
    assert "a3" not in _states(client)
    # Its folder is still in the store: a new request loads it again (lazily).
    assert len(client.generate(PROMPTS[2], "a3", max_new_tokens=4).token_ids) == 4
    with pytest.raises(AdapterNotFound):
        client.unload_adapter("never-loaded")


def test_adapter_copied_in_while_serving_is_usable(tier_server, peft_ref, toy) -> None:
    client = tier_server.client
    with pytest.raises(AdapterNotFound):
        client.generate(PROMPTS[0], "team/new", max_new_tokens=4)
    shutil.copytree(toy.adapter("a4"), tier_server.store / "team" / "new")
    got = client.generate(PROMPTS[0], "team/new", max_new_tokens=MAX_NEW).token_ids
    assert got == _expected(peft_ref, PROMPTS[0], "a4")
    assert "team/new" in [a.adapter_id for a in client.list_adapters(include_disk=True)]


def test_reload_picks_up_changed_files(tier_server, peft_ref, toy) -> None:
    client = tier_server.client
    first = client.load_adapter("a1")
    assert not first.reloaded
    assert client.generate(PROMPTS[0], "a1", max_new_tokens=MAX_NEW).token_ids == _expected(
        peft_ref, PROMPTS[0], "a1"
    )
    folder = tier_server.store / "a1"
    shutil.rmtree(folder)
    shutil.copytree(toy.adapter("a6"), folder)
    again = client.load_adapter("a1")
    assert again.reloaded and again.adapter.state == "device" and again.adapter.rank == 3
    assert client.generate(PROMPTS[0], "a1", max_new_tokens=MAX_NEW).token_ids == _expected(
        peft_ref, PROMPTS[0], "a6"
    )


def test_broken_adapter_fails_alone(tier_server, peft_ref) -> None:
    client = tier_server.client
    folder = tier_server.store / "broken"
    shutil.copytree(tier_server.store / "a1", folder)
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    for _ in range(2):  # refused again, from the remembered failure, while the files are unchanged
        with pytest.raises(AdapterRejected, match="not a valid safetensors file"):
            client.generate(PROMPTS[0], "broken", max_new_tokens=4)
    with pytest.raises(AdapterRejected):
        client.load_adapter("broken")
    with pytest.raises(InvalidRequest):
        client.load_adapter("../a1")
    assert client.generate(PROMPTS[0], "a1", max_new_tokens=MAX_NEW).token_ids == _expected(
        peft_ref, PROMPTS[0], "a1"
    )
    assert client.health() == "SERVING"
