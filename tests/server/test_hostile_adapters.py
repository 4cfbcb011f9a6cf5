"""Hostile adapters against a running server (issue 13 §2-§4): each is refused with a clear
FAILED_PRECONDITION, quickly, without leaking memory, while other tenants' streams keep going."""

from __future__ import annotations

import gc
import os
import resource
import shutil
import struct
import threading
import time

import grpc
import pytest

from loraserve_client import AdapterRejected, Client
from loraserve_client.api import loraserve_pb2 as pb2
from tests.helpers import PROMPTS, ServerThread

WEIGHTS = "adapter_model.safetensors"
# Exponential backtracking on a module name (no digit at its end) with a backtracking engine.
BACKTRACKING = r"(?:.|.){0,40}\d"
# Before the fix the regex attack froze every stream for 4.7 s per attempt (and this pattern for
# far longer: it held the GIL while matching) and the header attack for 13.8 s (parsing it). No
# wall-clock bound is asserted here (a loaded machine stretches any): the matching runs for a
# budget of this many seconds, during which the engine must keep stepping, and the header must
# never be read. tests/adapters/test_hardening.py checks the default budget itself.
MATCH_WINDOW_SECONDS = 5.0
# Engine steps the victims get during the matching window at the least: a matcher holding the GIL
# lets one or two through as it lets go; the fixed matcher lets through as many as the victims
# have tokens left (about 50).
MIN_STEPS_WHILE_MATCHING = 5
STREAM_TOKENS = 60


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.fixture(scope="module")
def hostile_server(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    store = root / "store"
    shutil.copytree(toy.store, store)
    with ServerThread(
        model=str(toy.base), adapters_dir=store, max_loaded_adapters=4, kv_cache_bytes=8 << 20
    ) as srv:
        srv.store, srv.root = store, root
        yield srv


def _plant(srv: ServerThread, adapter_id: str, source: str = "a1"):
    folder = srv.store / adapter_id
    shutil.copytree(srv.store / source, folder)
    return folder


def test_requests_for_a_broken_adapter_do_not_grow_memory(hostile_server) -> None:
    """Each request is padded with a 256 KiB unknown field: before the fix, re-raising the cached
    error kept every request alive through its traceback (300 × 256 KiB = 75 MiB here)."""
    folder = _plant(hostile_server, "broken-leak")
    (folder / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage-header!!")
    padding = b"\xab" * (256 << 10)
    request = pb2.GenerateRequest(prompt="o gato", adapter_id="broken-leak").SerializeToString()
    request += _varint((1000 << 3) | 2) + _varint(len(padding)) + padding
    with grpc.insecure_channel(hostile_server.target) as channel:
        generate = channel.unary_unary("/loraserve.v1.Inference/Generate")

        def hammer(times: int) -> None:
            for _ in range(times):
                with pytest.raises(grpc.RpcError) as caught:
                    generate(request, timeout=30)
                assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
                assert "not a valid safetensors file" in caught.value.details()

        # First-use allocations before measuring: the channel, caches, and the allocator's heaps
        # growing to hold 256 KiB messages in flight on several threads (seen: 4-10 MiB over the
        # first 300 requests, depending on timing; under 2 MiB over the next 300, loaded or not).
        hammer(300)
        gc.collect()
        before = _rss_bytes()
        hammer(300)
        gc.collect()
        growth = _rss_bytes() - before
    assert growth < 8 << 20, f"RSS grew {growth / 2**20:.1f} MiB over 300 requests for a broken adapter"


def test_an_oversized_sparse_adapter_is_refused_before_reading(hostile_server) -> None:
    folder = _plant(hostile_server, "huge")
    with open(folder / WEIGHTS, "r+b") as handle:
        handle.truncate(3 << 30)  # 3 GiB, sparse: it costs nothing on disk, all of it if read
    gc.collect()
    before = _rss_bytes()
    with Client(hostile_server.target, timeout=60) as client:
        with pytest.raises(
            AdapterRejected, match=r"above the server's limit of \d+ bytes.*--max-adapter-bytes"
        ):
            client.generate(PROMPTS[0], "huge", max_new_tokens=4)
        with pytest.raises(AdapterRejected, match="--max-adapter-bytes"):
            client.load_adapter("huge")
    assert _rss_bytes() - before < 64 << 20


def _stream(target: str, adapter: str, tokens: list[int], errors: list[BaseException]) -> None:
    try:
        with Client(target, timeout=300) as client:
            for chunk in client.generate_stream(
                PROMPTS[1], adapter, max_new_tokens=STREAM_TOKENS, ignore_eos=True
            ):
                tokens.extend(chunk.token_ids)
    except BaseException as error:  # noqa: BLE001 - reported by the test
        errors.append(error)


def _header_bomb(path) -> None:
    count = 1_200_000
    entry = '"base_model.model.t{i}.lora_A.weight":{{"dtype":"F32","shape":[1],"data_offsets":[{a},{b}]}}'
    header = ("{" + ",".join(entry.format(i=i, a=4 * i, b=4 * i + 4) for i in range(count)) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * (4 * count))


def test_regex_and_header_attacks_do_not_stall_other_streams(hostile_server, peft_ref, monkeypatch) -> None:
    import json

    from loraserve.adapters import weights as weights_module

    regex_folder = _plant(hostile_server, "evil-regex")
    config = json.loads((regex_folder / "adapter_config.json").read_text())
    config["target_modules"] = BACKTRACKING
    (regex_folder / "adapter_config.json").write_text(json.dumps(config))
    _header_bomb(_plant(hostile_server, "evil-header") / WEIGHTS)

    # Instruments on the server's reader and engine threads (the server runs in this process).
    engine = hostile_server.engine
    real_resolve, real_read_tensors = weights_module.resolve_modules, weights_module._read_tensors
    real_execute = engine.runner.execute
    attacking, matching = threading.Event(), threading.Event()
    steps_while_matching: list[int] = []
    weights_read: list[str] = []

    def resolve(config, names, budget=None):
        if config.target_modules != BACKTRACKING:
            return real_resolve(config, names, budget)
        steps = engine.steps
        matching.set()
        try:
            return real_resolve(config, names, MATCH_WINDOW_SECONDS)
        finally:
            steps_while_matching.append(engine.steps - steps)

    def read_tensors(opened, limits):
        weights_read.append(opened.adapter_id)
        return real_read_tensors(opened, limits)

    def execute(batch):
        if attacking.is_set() and not matching.is_set():
            matching.wait(120)  # the victims cannot finish before the matching begins
        return real_execute(batch)

    monkeypatch.setattr(weights_module, "resolve_modules", resolve)
    monkeypatch.setattr(weights_module, "_read_tensors", read_tensors)
    monkeypatch.setattr(engine.runner, "execute", execute)

    victims = ["a1", "a3", "org/a2"]
    results = {a: ([], []) for a in victims}
    threads = [
        threading.Thread(target=_stream, args=(hostile_server.target, a, *results[a])) for a in victims
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while not all(results[a][0] for a in victims) and time.monotonic() < deadline:
        time.sleep(0.01)  # every victim is streaming before the attacks
    try:
        with Client(hostile_server.target, timeout=120) as client:
            attacking.set()
            for _ in range(3):  # the second and third are refused from the remembered failure
                with pytest.raises(
                    AdapterRejected, match=f"took over {MATCH_WINDOW_SECONDS:g} s.*too expensive"
                ):
                    client.generate(PROMPTS[0], "evil-regex", max_new_tokens=4)
            for _ in range(3):
                with pytest.raises(AdapterRejected, match="refused before reading"):
                    client.generate(PROMPTS[0], "evil-header", max_new_tokens=4)
            assert client.health(timeout=60) == "SERVING"
    finally:
        matching.set()
    for thread in threads:
        thread.join(300)
    assert len(steps_while_matching) == 1  # matched once: later attempts met the remembered failure
    assert steps_while_matching[0] >= MIN_STEPS_WHILE_MATCHING, steps_while_matching
    assert "evil-header" not in weights_read  # not a byte of its header or data was read
    for adapter in victims:
        tokens, errors = results[adapter]
        assert not errors, errors
        assert tokens == peft_ref.generate(
            peft_ref.tokenizer(PROMPTS[1])["input_ids"], adapter, STREAM_TOKENS, ignore_eos=True
        ), adapter


def test_folder_swapped_for_a_link_before_the_read_is_refused(hostile_server, tmp_path) -> None:
    """The swap race of issue 13 §4, made deterministic: the folder becomes a link to an adapter
    outside the store right before the reader opens it."""
    _plant(hostile_server, "swapped")
    outside = tmp_path / "outside"
    shutil.copytree(hostile_server.store / "a5", outside)
    reader = hostile_server.engine.adapters.reader

    def swap(adapter_id: str) -> None:
        if adapter_id == "swapped":
            folder = hostile_server.store / "swapped"
            folder.rename(tmp_path / "was-swapped")
            os.symlink(outside, folder)

    reader.before_open = swap
    try:
        with Client(hostile_server.target, timeout=60) as client:
            with pytest.raises(AdapterRejected, match="symbolic link"):
                client.generate(PROMPTS[0], "swapped", max_new_tokens=4)
            assert "swapped" not in [a.adapter_id for a in client.list_adapters()]
            assert len(client.generate(PROMPTS[0], "a1", max_new_tokens=4).token_ids) == 4
    finally:
        reader.before_open = None
