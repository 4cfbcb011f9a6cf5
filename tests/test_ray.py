"""loraserve on Ray Serve: 2 replicas, 6 adapters, adapter-affinity routing, a replica killed mid-traffic."""

from __future__ import annotations

import subprocess
import threading
import time

import grpc
import pytest

from loraserve import ray_app
from loraserve.config import ServerConfig
from loraserve_client import Client, Unavailable
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
        allow_unauthenticated_remote=True,  # Ray's gRPC proxy listens on every interface
        ray_http_port=free_port(),
    )
    ray_app.start(config, replicas=2, address=None, num_cpus=1, num_gpus=0)
    target = f"127.0.0.1:{port}"
    # Replicas come up after the proxy, which answers UNAVAILABLE until then: wait for them
    # (longer than the client's own retries, which gRPC bounds at 4).
    with Client(target, ray_serve=True, retries=4, backoff=0.5, max_backoff=2) as client:
        deadline = time.monotonic() + 300
        while True:
            try:
                client.generate("hello", max_new_tokens=1)
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    yield target
    ray_app.stop()
    deadline = time.monotonic() + 120
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


def test_serving_without_keys_is_an_explicit_choice(toy) -> None:
    from loraserve.config import ConfigError

    with pytest.raises(ConfigError, match=r"listens on every interface \(\[::\]:50051\)"):
        ray_app.check_exposure(ServerConfig(model=str(toy.base)))
    ray_app.check_exposure(ServerConfig(model=str(toy.base), allow_unauthenticated_remote=True))


def test_ray_ports_come_from_the_config(toy) -> None:
    config = ServerConfig(model=str(toy.base), ray_dashboard_port=8365, ray_metrics_export_port=8366)
    assert ray_app.ray_init_options(config, None) == {
        "log_to_driver": False,
        "include_dashboard": True,
        "dashboard_port": 8365,
        "_metrics_export_port": 8366,
    }
    assert ray_app.ray_init_options(ServerConfig(model=str(toy.base)), None)["include_dashboard"] is False
    assert ray_app.ray_init_options(config, "auto") == {"address": "auto", "log_to_driver": False}


def test_errors_keep_their_status_and_name_the_request(ray_target) -> None:
    options = ClientOptions(target=ray_target, ray_serve=True)
    with grpc.insecure_channel(ray_target) as channel:
        stub = pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(pb2.GenerateRequest(prompt=""), metadata=options.call_metadata(""), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt is empty" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(
                pb2.GenerateRequest(prompt="hi", adapter_id="a1"),
                metadata=options.call_metadata("../etc"),
                timeout=60,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "adapter_id" in caught.value.details()


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
