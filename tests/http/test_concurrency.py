"""Both front ends on one engine: HTTP and gRPC requests share batches, and clients that go away
(streaming or not) leave no KV blocks, adapter pins or admission counts behind."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from loraserve_client import AsyncClient, Client
from tests.helpers import PROMPTS, settle
from tests.http.conftest import HeldEngine

ADAPTERS = ["a1", "org/a2"]


def cancelled(srv) -> float:
    return srv.metrics.request_errors.labels("CANCELLED")._value.get()


def test_http_and_grpc_requests_share_batches(http_server, base_url, monkeypatch) -> None:
    engine = http_server.engine
    # Both adapters in the server's two device slots first: were one still being read when the
    # engine is released, the other's requests could run (and finish) without it, in batches of
    # one adapter only, however the requests arrived.
    with Client(http_server.target) as client:
        for adapter in ADAPTERS:
            client.load_adapter(adapter)
    assert all(engine.adapters.describe_one(a).tier == "device" for a in ADAPTERS)
    held = HeldEngine(http_server, monkeypatch)
    batches: list[list[tuple[str, str]]] = []
    inner = engine.runner.execute

    def record(batch):
        batches.append([(item.seq.request_id, item.seq.request.adapter_id) for item in batch])
        return inner(batch)

    monkeypatch.setattr(engine.runner, "execute", record)

    async def run() -> tuple[set[str], set[str]]:
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=120) as http,
            AsyncClient(http_server.target, retries=0) as grpc_client,
        ):

            async def over_http(i: int) -> str:
                body = {
                    "model": ADAPTERS[i % 2],
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": 8,
                    "temperature": 0,
                }
                response = await http.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                return response.headers["x-request-id"]

            async def over_grpc(i: int) -> str:
                answer = await grpc_client.generate(
                    PROMPTS[i % len(PROMPTS)], ADAPTERS[(i + 1) % 2], max_new_tokens=8
                )
                return answer.request_id

            tasks = [asyncio.create_task(over_http(i)) for i in range(6)]
            tasks += [asyncio.create_task(over_grpc(i)) for i in range(6)]
            # Every request is in the engine before the forward pass after the held one runs:
            # that step admits all those still queued, on the two resident adapters.
            deadline = time.monotonic() + 120
            while engine.in_flight < 12 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert engine.in_flight == 12
            held.release()
            ids = await asyncio.gather(*tasks)
            return set(ids[:6]), set(ids[6:])

    try:
        http_ids, grpc_ids = asyncio.run(run())
    finally:
        held.release()
    shared = [
        batch
        for batch in batches
        if {rid for rid, _ in batch} & http_ids
        and {rid for rid, _ in batch} & grpc_ids
        and len({adapter for _, adapter in batch}) == 2
    ]
    assert shared, batches
    settle(http_server)


async def _stream_and_maybe_leave(http: httpx.AsyncClient, i: int) -> str:
    """One of 32 streams: every other one reads two events and closes the connection."""
    adapter = ["a1", "org/a2", "a3", "", "a6"][i % 5]
    if i % 3 == 0:
        url = "/generate_stream"
        body = {
            "inputs": PROMPTS[i % len(PROMPTS)],
            "parameters": {"adapter_id": adapter, "max_new_tokens": 40, "ignore_eos_token": True},
        }
    else:
        url = "/v1/chat/completions" if i % 3 == 1 else "/v1/completions"
        body = {"model": adapter or "__base__", "max_tokens": 40, "stream": True}
        if url.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        else:
            body["prompt"] = PROMPTS[i % len(PROMPTS)]
    leave = i % 2 == 0
    events = 0
    async with http.stream("POST", url, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                events += 1
                if leave and events == 2:
                    return "left"
    return "finished"


def test_32_streams_with_disconnects_leave_nothing_held(http_server, base_url) -> None:
    before = cancelled(http_server)

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
            return await asyncio.gather(*(_stream_and_maybe_leave(http, i) for i in range(32)))

    outcomes = asyncio.run(run())
    assert outcomes.count("left") == 16 and outcomes.count("finished") == 16
    settle(http_server)
    assert cancelled(http_server) > before  # streams cut mid-generation were ended as cancelled


def test_a_client_that_gives_up_on_a_plain_request_ends_it(http_server, base_url, monkeypatch) -> None:
    held = HeldEngine(http_server, monkeypatch)
    before = cancelled(http_server)
    body = {"model": "a1", "prompt": "hello", "max_tokens": 50}
    try:
        # The engine is held: no answer can come, whatever the machine's speed.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base_url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
        deadline = time.monotonic() + 120
        while cancelled(http_server) == before and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        held.release()
    assert cancelled(http_server) == before + 1
    settle(http_server)
