"""Start-up, health, reflection, config errors and graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from loraserve import app as app_module
from loraserve import model_loader
from loraserve.config import ServerConfig
from loraserve_client import Client, Unavailable
from tests.helpers import free_port, gate_model_load, serve_toy


def test_health_is_not_serving_until_the_model_is_loaded(toy, monkeypatch) -> None:
    gate = gate_model_load(monkeypatch)  # set in the finally: the load waits for the checks below
    config = ServerConfig(model=str(toy.base), port=0, metrics_port=0, device="cpu", kv_cache_bytes=2 << 20)
    loop = asyncio.new_event_loop()
    server = app_module.LoraServer(config)
    threading.Thread(target=loop.run_forever, daemon=True).start()
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
    try:
        with Client(f"127.0.0.1:{port}", retries=0) as client:
            assert client.health() == "NOT_SERVING"
            assert client.health("loraserve.v1.Inference") == "NOT_SERVING"
            with pytest.raises(Unavailable, match="starting"):
                client.generate("hello", max_new_tokens=2)
            gate.set()
            client.wait_until_serving(120)
            assert client.generate("hello", max_new_tokens=2).usage.completion_tokens == 2
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
            assert {"loraserve.v1.Inference", "loraserve.v1.AdapterAdmin", "grpc.health.v1.Health"} <= set(
                services
            )
            channel.close()
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(server.drain(0), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)


def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraserve.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--model", "/nonexistent/model"], {}, "--model: model directory not found: /nonexistent/model"),
        (["--quantization", "nf5"], {}, "--quantization: Input should be 'nf4', 'fp4', 'int8' or 'none'"),
        ([], {"LORASERVE_QUANTIZATION": "q2"}, "--quantization:"),
        (["--port", "70000"], {}, "--port:"),
        (["--host", "0.0.0.0"], {}, "not loopback and no api_keys_file"),
        (["--metrics-host", "0.0.0.0"], {}, "metrics_host 0.0.0.0 is not loopback and no api_keys_file"),
        (["--tls-cert-file", "/no/cert.pem"], {}, "tls_cert_file: file not found"),
        (["--max-loaded-adapters", "0"], {}, "--max-loaded-adapters:"),
    ],
)
def test_config_errors_exit_with_one_line(toy, args, env, message) -> None:
    base = [] if "--model" in args else ["--model", str(toy.base)]
    run = _serve(*base, *args, env=env)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loraserve: error:"), run.stderr
    assert message in lines[0]


def test_sigterm_during_start_up_stops_cleanly(toy, monkeypatch, caplog) -> None:
    loading, release = threading.Event(), threading.Event()
    real_load = model_loader.load_base_model

    def slow_load(*args, **kwargs):
        loading.set()
        release.wait(60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(model_loader, "load_base_model", slow_load)
    config = ServerConfig(model=str(toy.base), port=0, metrics_port=0, device="cpu", kv_cache_bytes=2 << 20)
    server = app_module.LoraServer(config)

    def terminate_while_loading() -> None:
        assert loading.wait(60)
        os.kill(os.getpid(), signal.SIGTERM)  # run() handles it on its loop, like `loraserve serve`

    def engines() -> int:
        return sum(t.name == "engine" for t in threading.enumerate())

    before = engines()
    threading.Thread(target=terminate_while_loading, daemon=True).start()
    try:
        with caplog.at_level(logging.INFO):
            assert asyncio.run(server.run()) == 0
    finally:
        release.set()
    assert server.failed is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "interrupted during start-up" in caplog.text
    deadline = time.monotonic() + 120  # the engine finished loading after the signal: it is shut down
    while engines() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engines() == before


def test_flags_override_environment(monkeypatch) -> None:
    from loraserve.cli import build_parser, config_from_args

    monkeypatch.setenv("LORASERVE_MAX_LORA_RANK", "32")
    monkeypatch.setenv("LORASERVE_PORT", "6000")
    args = build_parser().parse_args(["serve", "--port", "7000", "--no-warmup"])
    config = config_from_args(args)
    assert (config.port, config.max_lora_rank, config.warmup) == (7000, 32, False)


def _wait_serving(target: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    with Client(target, retries=0) as client:
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()
            try:
                if client.health(timeout=1) == "SERVING":
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.2)
    raise TimeoutError("server did not become SERVING")


def _accepted(metrics_port: int) -> float:
    """Requests the server's engine has accepted so far, from its metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    name = "loraserve_adapter_requests_total"
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_sigterm_drains_in_flight_streams_then_exits_zero(toy) -> None:
    port, metrics_port = free_port(), free_port()
    process = serve_toy(
        toy,
        port,
        *("--metrics-port", str(metrics_port), "--max-num-seqs", "1", "--kv-cache-bytes", str(4 << 20)),
        # Generous: the three streams run one at a time, and a loaded 2-core machine was seen
        # taking over a minute for them; an idle one takes a few seconds.
        *("--drain-seconds", "300"),
    )
    target = f"127.0.0.1:{port}"
    try:
        _wait_serving(target, process)
        results: dict[int, object] = {}
        first_chunk = threading.Event()

        def stream(i: int) -> None:
            with Client(target, retries=0) as client:
                try:
                    chunks = []
                    for chunk in client.generate_stream(
                        "hi", ["a1", "org/a2", ""][i], max_new_tokens=96, ignore_eos=True
                    ):
                        chunks.append(chunk)
                        first_chunk.set()
                    results[i] = sum(len(c.token_ids) for c in chunks)
                except Exception as error:  # noqa: BLE001 - recorded for the assertion
                    results[i] = error

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        assert first_chunk.wait(120)
        # All three accepted by the engine before the signal (one seat: they run one at a time),
        # however late their threads got to send them; then the signal, and new work once the
        # server has started draining (health NOT_SERVING comes with the guard's DRAINING phase).
        deadline = time.monotonic() + 120
        while _accepted(metrics_port) < 3:
            assert time.monotonic() < deadline, "the three streams were not all accepted"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        with Client(target, retries=0) as client:

            def serving() -> bool:
                try:
                    return client.health(timeout=30) == "SERVING"
                except Unavailable:  # drained and gone already
                    return False

            deadline = time.monotonic() + 120
            while serving():
                assert time.monotonic() < deadline, "the server did not start draining"
                time.sleep(0.02)
            with pytest.raises(Unavailable):
                client.generate("new work", max_new_tokens=2)
        for thread in threads:
            thread.join(320)
        assert results == {0: 96, 1: 96, 2: 96}
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
