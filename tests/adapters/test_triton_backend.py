"""The `triton` LoRA backend: its kernels against the `reference` backend, and how it is chosen.

On CPU the kernels run in Triton's interpreter, which must be chosen before triton is first
imported: one subprocess (`python -m tests.triton_cases lora`) runs every case and each test below
reads its own result, so the rest of the suite's process never imports triton in interpreter mode.
On a CUDA machine the same cases also run compiled, in-process (marked `gpu`).

Cases (tests/triton_cases.py): mixed ranks across two rank tiles, empty slots, base-only tokens,
unsorted and split runs, T=1, a prefill longer than one token block next to decodes, the split-K
shrink; in float32 and bfloat16 with per-dtype tolerances against float64.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraserve.adapters.lora_backends import TorchBackend, select_lora_backend, triton_unavailable
from loraserve.config import ConfigError, load_config
from tests.triton_cases import cases, interpreter_results, run_case

ROOT = Path(__file__).resolve().parents[2]
LORA_CASES = sorted(name for name in cases() if name.startswith("lora "))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str | None]:
    pytest.importorskip("triton")
    return interpreter_results("lora ")


@pytest.mark.parametrize("name", LORA_CASES)
def test_kernels_match_the_reference_in_the_interpreter(interpreted, name: str) -> None:
    assert name in interpreted, f"the worker did not run {name!r}"
    assert interpreted[name] is None, interpreted[name]


@pytest.mark.gpu
@pytest.mark.parametrize("name", LORA_CASES)
def test_kernels_match_the_reference_on_cuda(name: str) -> None:
    pytest.importorskip("triton")
    run_case(name, torch.device("cuda"))


def test_interpreter_selection(interpreted) -> None:
    """Under TRITON_INTERPRET=1, `triton` may be forced on CPU; `auto` stays `torch` off CUDA."""
    script = (
        "import torch\n"
        "from loraserve.adapters.lora_backends import select_lora_backend\n"
        "cpu = torch.device('cpu')\n"
        "print(select_lora_backend('triton', cpu).name, select_lora_backend('auto', cpu).name)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.split() == ["triton", "torch"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_forcing_triton_without_cuda_is_a_config_error(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert isinstance(select_lora_backend("auto", CPU), TorchBackend)
    reason = triton_unavailable(CPU)
    assert reason is not None
    with pytest.raises(ValueError, match=r"^the triton LoRA backend cannot run here: "):
        select_lora_backend("triton", CPU)
    message = r"^--lora-backend: the triton LoRA backend cannot run here: "
    with pytest.raises(ConfigError, match=message) as error:
        load_config(lora_backend="triton")
    assert "\n" not in str(error.value)
    if importlib.util.find_spec("triton") is not None:  # (triton is imported by now, not interpreted)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert triton_unavailable(CPU) is None
        assert load_config(lora_backend="triton").lora_backend == "triton"


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda() -> None:
    pytest.importorskip("triton")
    assert select_lora_backend("auto", torch.device("cuda")).name == "triton"


@pytest.mark.gpu
def test_a_step_of_applies_is_captured_in_a_cuda_graph() -> None:
    """apply makes no data-dependent Python decision: captured once for a plan, a replay on new
    inputs (same plan) gives the reference's result."""
    pytest.importorskip("triton")
    from loraserve.adapters.lora_backends import TritonBackend, lora_reference

    cuda = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    ranks = [8, 16, 4]
    slots = [2, 0, -1, 0, 1] + [1] * 40
    a = torch.randn(3, 16, 96, generator=g).to(cuda) / 10
    b = torch.randn(3, 80, 16, generator=g).to(cuda) / 4
    for s, r in enumerate(ranks):
        a[s, r:] = 0
        b[s, :, r:] = 0
    x = torch.zeros(len(slots), 96, device=cuda)
    y = torch.zeros(len(slots), 80, device=cuda)
    backend = TritonBackend(cuda)
    plan = backend.plan(slots, ranks)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        backend.apply(y, x, a, b, plan)  # compiles the kernels before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.apply(y, x, a, b, plan)
    x.copy_(torch.randn(len(slots), 96, generator=g))
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    expected = lora_reference(x.double().cpu(), slots, a.double().cpu(), b.double().cpu())
    torch.testing.assert_close(y.double().cpu(), expected, rtol=2e-5, atol=2e-5)
