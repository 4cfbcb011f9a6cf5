"""The HTTP front end's lifecycle with the server's: 503 while starting and draining, /health as
gRPC health, SIGTERM draining both front ends, TLS from the same files as gRPC, port checks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from loraserve import app as app_module
from loraserve.config import ConfigError, ServerConfig, load_config
from loraserve.guard import DRAINING
from loraserve_client import Client
from tests.helpers import ServerThread, free_port, gate_model_load
from tests.http.conftest import HeldEngine
from tests.server.certs import make_pki

CHAT = {"model": "__base__", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_503_and_not_serving_until_the_model_is_loaded(toy, monkeypatch) -> None:
    gate = gate_model_load(monkeypatch)  # set in the finally: the load waits for the checks below
    port = free_port()
    config = ServerConfig(
        model=str(toy.base), port=0, metrics_port=0, device="cpu", kv_cache_bytes=2 << 20, http_port=port
    )
    loop = asyncio.new_event_loop()
    server = app_module.LoraServer(config)
    threading.Thread(target=loop.run_forever, daemon=True).start()
    grpc_port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
    url = f"http://127.0.0.1:{port}"
    try:
        health = httpx.get(url + "/health", timeout=60)
        assert health.status_code == 503 and health.json() == {"status": "NOT_SERVING"}
        starting = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
        assert starting.status_code == 503 and "starting" in starting.json()["error"]["message"]
        assert starting.headers["x-should-retry"] == "true"  # the one status worth retrying
        assert httpx.get(url + "/", timeout=60).status_code == 200  # the page itself is static
        gate.set()
        wait_for(lambda: httpx.get(url + "/health", timeout=60).status_code == 200)
        with Client(f"127.0.0.1:{grpc_port}") as client:
            assert client.health() == "SERVING"
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(server.drain(0), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def test_drain_refuses_new_http_calls_and_finishes_those_in_flight(toy, monkeypatch) -> None:
    srv = ServerThread(
        model=str(toy.base), adapters_dir=toy.store, kv_cache_bytes=2 << 20, http_port=free_port()
    )
    srv.start()
    url = f"http://127.0.0.1:{srv.server.http.port}"
    held = HeldEngine(srv, monkeypatch)
    events: list[str] = []

    def stream() -> None:
        body = {**CHAT, "model": "a1", "max_tokens": 6, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            events.extend(line for line in response.iter_lines() if line.startswith("data:"))

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert held.entered.wait(120)
        drained = asyncio.run_coroutine_threadsafe(srv.server.drain(120), srv._loop)
        wait_for(lambda: srv.server.guard.phase == DRAINING)
        refused = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert httpx.get(url + "/health", timeout=60).status_code == 503
        with Client(srv.target) as client:
            assert client.health() == "NOT_SERVING"
    finally:
        held.release()
    reader.join(120)
    assert events[-1] == "data: [DONE]"  # the request in flight finished
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    drained.result(120)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")
    srv.stop()


def test_sigterm_drains_both_front_ends(toy) -> None:
    port = free_port()
    env = {**os.environ, "LORASERVE_HTTP_PORT": str(port)}
    args = ["--model", str(toy.base), "--adapters-dir", str(toy.store), "--port", "0", "--metrics-port", "0"]
    args += ["--drain-seconds", "300"]  # a loaded machine may take long over 40 tokens: no cut
    process = subprocess.Popen(
        [sys.executable, "-m", "loraserve.cli", "serve", *args, "--kv-cache-bytes", str(2 << 20)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def serving() -> bool:
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                return False

        wait_for(serving, 120)
        body = {
            "inputs": "hello",
            "parameters": {
                "adapter_id": "a1",
                "max_new_tokens": 40,
                "ignore_eos_token": True,
                "details": True,
            },
        }
        finals, signalled = [], False
        with httpx.stream("POST", url + "/generate_stream", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                if not signalled:
                    process.send_signal(signal.SIGTERM)  # after the first token: the stream is in flight
                    signalled = True
                message = json.loads(line.removeprefix("data:"))
                if message.get("generated_text") is not None:
                    finals.append(message)
        assert finals and finals[0]["details"]["generated_tokens"] == 40
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    output = process.stdout.read()
    assert "draining" in output and "stopped" in output


def test_tls_from_the_same_files_as_grpc(toy, tmp_path) -> None:
    pki = make_pki(tmp_path)
    with ServerThread(
        model=str(toy.base),
        kv_cache_bytes=2 << 20,
        tls_cert_file=pki["server.pem"],
        tls_key_file=pki["server.key"],
        http_port=free_port(),
    ) as srv:
        url = f"https://127.0.0.1:{srv.server.http.port}"
        answer = httpx.post(url + "/v1/chat/completions", json=CHAT, verify=str(pki["ca.pem"]), timeout=60)
        assert answer.status_code == 200, answer.text
        with pytest.raises(httpx.TransportError):
            httpx.post(url.replace("https", "http") + "/v1/chat/completions", json=CHAT, timeout=10)
        with Client(srv.target, ca_cert=pki["ca.pem"]) as client:
            assert client.health() == "SERVING"


def test_http_port_checks(toy) -> None:
    with pytest.raises(ConfigError, match="http_port 50051 is also port"):
        load_config(model=str(toy.base), http_port=50051, port=50051)
    with pytest.raises(ConfigError, match="--http-port"):
        load_config(model=str(toy.base), http_port=70000)
    assert ServerConfig.model_fields["http_port"].default == 8000
    with (
        socket_taken() as port,
        pytest.raises(ConfigError, match=f"--http-port: cannot bind 127.0.0.1:{port}"),
    ):
        ServerThread(model=str(toy.base), kv_cache_bytes=2 << 20, http_port=port).start()


class socket_taken:
    """A port some other process holds."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
