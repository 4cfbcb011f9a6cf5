"""Serving check of the `triton` LoRA backend: `loraserve serve` with LORASERVE_LORA_BACKEND=triton
under Triton's CPU interpreter (TRITON_INTERPRET=1, set before the server process imports triton)
gives PEFT's greedy tokens for requests on mixed adapters and the base model sharing batches.

The environment forces the backend: where it could not run, the server would stop at start-up with
a config error instead of falling back to another backend."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from loraserve_client import Client
from tests.helpers import PROMPTS, TOY_ADAPTERS, free_port, serve_toy
from tests.server.test_lifecycle import _wait_serving

MAX_NEW = 5


def test_triton_backend_serves_peft_exact_tokens(toy, peft_ref) -> None:
    pytest.importorskip("triton")
    port = free_port()
    env = {**os.environ, "TRITON_INTERPRET": "1", "LORASERVE_LORA_BACKEND": "triton"}
    process = serve_toy(
        toy,
        port,
        *("--metrics-port", "0", "--device", "cpu", "--max-loaded-adapters", str(len(TOY_ADAPTERS))),
        *("--kv-cache-bytes", str(4 << 20)),
        env=env,
    )
    target = f"127.0.0.1:{port}"
    jobs = [(PROMPTS[i % len(PROMPTS)], adapter) for i, adapter in enumerate(["", *TOY_ADAPTERS])]
    results: dict[int, object] = {}
    try:
        _wait_serving(target, process, timeout=180)
        with Client(target, retries=0, timeout=600) as client:
            for adapter in TOY_ADAPTERS:  # resident first, so that one batch holds every adapter
                client.load_adapter(adapter)
        start = threading.Barrier(len(jobs))

        def generate(i: int) -> None:
            prompt, adapter = jobs[i]
            with Client(target, retries=0, timeout=600) as client:
                start.wait(60)
                try:
                    results[i] = client.generate(prompt, adapter, max_new_tokens=MAX_NEW, ignore_eos=True)
                except Exception as error:  # noqa: BLE001 - recorded for the assertion
                    results[i] = error

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(900)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    stderr = process.stderr.read()
    for i, (prompt, adapter) in enumerate(jobs):
        result = results.get(i)
        assert not isinstance(result, BaseException) and result is not None, (adapter, result, stderr[-3000:])
        ids = peft_ref.tokenizer(prompt)["input_ids"]
        expected = peft_ref.generate(ids, adapter, MAX_NEW, ignore_eos=True)
        assert list(result.token_ids) == expected, (prompt, adapter)


@pytest.mark.gpu
def test_cuda_server_matches_peft_with_the_triton_kernels(toy) -> None:
    """On CUDA, `auto` serves with the triton LoRA backend and the Triton paged-attention kernel;
    greedy tokens for the base model and six adapters sent together equal PEFT's (unquantized,
    float32 on CPU, so that both sides compute the same function)."""
    pytest.importorskip("triton")
    from loraserve.engine.paged_attention import kernel_available
    from tests.helpers import PeftReference, ServerThread

    assert kernel_available("cuda")
    reference = PeftReference(toy, quantization="none")
    config = {
        "model": str(toy.base),
        "adapters_dir": toy.store,
        "device": "cuda",
        "quantization": "none",
        "compute_dtype": "float32",
        "max_loaded_adapters": len(TOY_ADAPTERS),
        "kv_cache_bytes": 4 << 20,
    }
    jobs = [(PROMPTS[i % len(PROMPTS)], adapter) for i, adapter in enumerate(["", *TOY_ADAPTERS])]
    results: dict[int, object] = {}
    with ServerThread(**config) as server:
        assert server.engine.slots.backend.name == "triton"
        start = threading.Barrier(len(jobs))

        def generate(i: int) -> None:
            prompt, adapter = jobs[i]
            with Client(server.target, retries=0, timeout=300) as client:
                start.wait(60)
                results[i] = client.generate(prompt, adapter, max_new_tokens=MAX_NEW, ignore_eos=True)

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    for i, (prompt, adapter) in enumerate(jobs):
        ids = reference.tokenizer(prompt)["input_ids"]
        expected = reference.generate(ids, adapter, MAX_NEW, ignore_eos=True)
        assert list(results[i].token_ids) == expected, (prompt, adapter)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_forcing_triton_without_cuda_stops_serve_with_one_line(toy) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["serve", "--model", str(toy.base), "--lora-backend", "triton"]
    run = subprocess.run(
        [sys.executable, "-m", "loraserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("loraserve: error: --lora-backend: the triton LoRA backend cannot run here: ")
