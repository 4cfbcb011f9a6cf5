"""loraserve on Ray Serve: 2 replicas, 6 adapters, adapter-affinity routing, a replica killed mid-traffic."""

from __future__ import annotations

import subprocess
import threading
import time

import grpc
import pytest

from loraserve import ray_app
from loraserve.config import ServerConfig
from loraserve_client import Client
from loraserve_client.api import loraserve_pb2 as pb2
from loraserve_client.api import loraserve_pb2_grpc as pb2_grpc
from loraserve_client.base import ClientOptions
from tests.helpers import PROMPTS, TOY_ADAPTERS, free_port

ADAPTERS = list(TOY_ADAPTERS)
MAX_NEW = 8


def ray_processes() -> list[str]:
    found = subprocess.run(
        ["pgrep", "-af", "raylet|gcs_server|ray::|dashboard/agent"], capture_output=True, text=True
    ).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="module")
def ray_target(toy):
    assert not ray_processes(), "a Ray instance is already running on this machine"
    port = free_port()
    config = ServerConfig(
        model=str(toy.base),
        adapters_dir=toy.store,
        port=port,
        metrics_port=0,
        device="cpu",
        max_loaded_adapters=6,
        kv_cache_bytes=2 << 20,
    )
    ray_app.start(config, replicas=2, address=None, num_cpus=1, num_gpus=0, http_port=free_port())
    target = f"127.0.0.1:{port}"
    with Client(target, ray_serve=True, retries=20, backoff=0.5, max_backoff=2) as client:
        client.generate("hello", max_new_tokens=1)
    yield target
    ray_app.stop()
    deadline = time.monotonic() + 30
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(), ray_processes()  # tear-down leaves no Ray processes behind


def call(target: str, prompt: str, adapter: str) -> tuple[list[int], str]:
    """One Generate through Ray's proxy; returns (token ids, the replica that answered)."""
    options = ClientOptions(target=target, ray_serve=True)
    with grpc.insecure_channel(target) as channel:
        stub = pb2_grpc.InferenceStub(channel)
        request = pb2.GenerateRequest(
            prompt=prompt, adapter_id=adapter, stopping=pb2.StoppingCriteria(max_new_tokens=MAX_NEW)
        )
        response, rpc = stub.Generate.with_call(request, metadata=options.call_metadata(adapter), timeout=60)
    replica = dict(rpc.trailing_metadata() or ()).get(ray_app.REPLICA_HEADER, "")
    return list(response.token_ids), replica


def expected(peft_ref, prompt: str, adapter: str) -> list[int]:
    return peft_ref.generate(peft_ref.tokenizer(prompt)["input_ids"], adapter, MAX_NEW)


def test_outputs_match_peft_and_requests_stick_to_their_replica(ray_target, peft_ref) -> None:
    home = {}
    for adapter in ["", *ADAPTERS]:  # one request each: every adapter is loaded on exactly one replica
        tokens, home[adapter] = call(ray_target, PROMPTS[0], adapter)
        assert tokens == expected(peft_ref, PROMPTS[0], adapter), adapter
    time.sleep(3)  # Ray's routers learn which replica holds which model (pushed every 0.1 s, then polled)
    for _ in range(3):
        for adapter in ADAPTERS:
            tokens, replica = call(ray_target, PROMPTS[1], adapter)
            assert tokens == expected(peft_ref, PROMPTS[1], adapter), adapter
            assert replica == home[adapter], (adapter, replica, home[adapter])  # the replica that holds it


def test_killing_a_replica_loses_no_retried_request(ray_target, peft_ref) -> None:
    import ray

    results: dict[int, list[int]] = {}
    failures: list[str] = []
    started = threading.Event()

    def worker(i: int) -> None:
        adapter = ADAPTERS[i % len(ADAPTERS)]
        prompt = PROMPTS[i % len(PROMPTS)]
        for attempt in range(30):  # the client retries whatever failed
            try:
                results[i] = call(ray_target, prompt, adapter)[0]
                started.set()
                return
            except grpc.RpcError as error:
                failures.append(error.code().name)
                time.sleep(0.3 * (attempt + 1))

    _, victim = call(ray_target, PROMPTS[1], ADAPTERS[0])
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    started.wait(60)
    actor = ray.get_actor(f"SERVE_REPLICA::{ray_app.APP_NAME}#LoraserveReplica#{victim}", namespace="serve")
    ray.kill(actor, no_restart=True)
    for thread in threads:
        thread.join(300)
    assert len(results) == 24
    for i, tokens in results.items():
        assert tokens == expected(peft_ref, PROMPTS[i % len(PROMPTS)], ADAPTERS[i % len(ADAPTERS)]), i
    # The survivor (and, later, the replacement) serves every adapter.
    for adapter in ADAPTERS:
        tokens, replica = call(ray_target, PROMPTS[2], adapter)
        assert tokens == expected(peft_ref, PROMPTS[2], adapter)
        assert replica != victim
