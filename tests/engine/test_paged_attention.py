"""The Triton paged-attention kernel against the SDPA-over-a-gather path, and its step plan.

The kernel runs under Triton's interpreter in a subprocess (`python -m tests.triton_cases attention`,
see tests/adapters/test_triton_backend.py for why) and compiled on CUDA (marked `gpu`). Cases:
decode sequences of 1 to 64 tokens, prefill chunks with and without a past, a step mixing both,
a sliding window; GQA (4 query heads on 2 KV heads), scattered block tables; fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from loraserve.engine.paged_attention import PREFILL_BLOCK_Q, build_plan, kernel_available
from tests.triton_cases import ATTENTION_STEPS, BLOCK, _attention_step, cases, interpreter_results, run_case

ATTENTION_CASES = sorted(name for name in cases() if name.startswith("attention "))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str | None]:
    pytest.importorskip("triton")
    return interpreter_results("attention ")


@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_kernel_matches_the_sdpa_path_in_the_interpreter(interpreted, name: str) -> None:
    assert name in interpreted, f"the worker did not run {name!r}"
    assert interpreted[name] is None, interpreted[name]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_kernel_matches_the_sdpa_path_on_cuda(name: str) -> None:
    pytest.importorskip("triton")
    run_case(name, torch.device("cuda"))


def test_cpu_keeps_the_sdpa_path() -> None:
    assert not kernel_available("cpu")


def test_the_step_plan_reads_each_sequence_through_its_rows() -> None:
    """Decode: one tile per sequence over the runner's row table; prefill: BLOCK_Q-token tiles,
    a chunk without a past reading its own new rows, a later chunk its whole context."""
    steps = ATTENTION_STEPS["mixed step"]  # (past, new): decodes, a first chunk, a later chunk
    make, _ = _attention_step(steps, CPU)
    cache = torch.zeros(1, 24 * BLOCK, 2, 16)
    meta = make(cache, cache)
    plan = build_plan(meta)
    assert meta.paged_plan() is meta.paged_plan()  # built once per step, shared by the layers

    decode = plan.decode
    assert decode is not None and decode.block_q == 1
    assert decode.seqs.tolist() == [[0, 38, 55], [1, 1, 1], [6, 48, 3]]  # first token, count, context
    assert decode.tiles.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert torch.equal(decode.rows, meta.decode_rows)

    prefill = plan.prefill
    assert prefill is not None and prefill.block_q == PREFILL_BLOCK_Q
    assert prefill.seqs.tolist() == [[1, 39], [37, 16], [37, 32]]
    # 37 new tokens in 16-token tiles, then the 16-token chunk in one
    assert prefill.tiles.tolist() == [[0, 0, 0, 1], [0, 16, 32, 0]]
    first, later = meta.prefills
    assert torch.equal(prefill.rows[0, :37], meta.cache_rows[first.start : first.start + 37])
    assert torch.equal(prefill.rows[1, :32], later.rows)
    # the later chunk's new tokens sit at the end of its context, in the rows it writes
    assert torch.equal(later.rows[16:], meta.cache_rows[later.start : later.start + 16])


@pytest.mark.gpu
def test_the_kernel_is_captured_in_a_cuda_graph() -> None:
    """With the step's plan built, the attention call makes no host decision: captured once, a
    replay after new keys/values are written gives a fresh call's result."""
    pytest.importorskip("triton")
    from loraserve.engine.paged_attention import triton_paged_attention

    cuda = torch.device("cuda")
    make, num_tokens = _attention_step(ATTENTION_STEPS["mixed step"], cuda)
    cache = torch.randn(2, 1, 24 * BLOCK, 2, 16, device=cuda)
    meta = make(cache[0], cache[1])
    plan = meta.paged_plan()
    q = torch.randn(4, num_tokens, 16, device=cuda)
    k_layer, v_layer = meta.k_cache[0], meta.v_cache[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        triton_paged_attention(plan, q, k_layer, v_layer, None, None)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_paged_attention(plan, q, k_layer, v_layer, None, None)
    k_layer.normal_()
    q.normal_()
    graph.replay()
    torch.testing.assert_close(out, triton_paged_attention(plan, q, k_layer, v_layer, None, None))
