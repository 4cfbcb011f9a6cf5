"""Cases for the Triton kernels (LoRA shrink/expand, paged attention), runnable on any device.

Each case builds its inputs, runs the Triton path and its reference, and raises AssertionError
(torch.testing.assert_close) on a mismatch:

- LoRA: the `triton` backend against the `reference` backend in float64 on the same rounded inputs;
- attention: `triton_paged_attention` against `paged_attention_forward`'s SDPA-over-a-gather path
  (the CPU path) in float64, on the same cache and step metadata.

Triton's interpreter must be chosen before triton is first imported, so on CPU these cases run in
a subprocess: `python -m tests.triton_cases PREFIX` sets TRITON_INTERPRET=1, runs every case whose
name starts with PREFIX on CPU tensors and prints one JSON object {case: null | error}. On CUDA the
tests call `run_case` in-process (compiled kernels). Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

# (rtol, atol) against the float64 reference. bfloat16 keeps 8 bits of mantissa (relative step
# 2**-8 ~ 0.004): the kernels round h and y + Δ (LoRA) or p and the output (attention) to it.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# --- LoRA ---------------------------------------------------------------------------------------

N_IN, N_OUT = 48, 72  # not multiples of the kernels' tiles: masks are exercised
LONG = 80  # a prefill run longer than one 64-token block
# Slot ranks: slots 1 and 5 are empty (rank 0); slot 4's rank 24 spans two 16-wide rank tiles,
# the others stop inside the first (their second tile is skipped).
RANKS = [4, 0, 8, 2, 24, 0]
LORA_SLOTS: dict[str, list[int]] = {
    "decode one token per slot": [0, 2, 3, 4],
    "mixed ranks with base tokens": [-1, 0, -1, 3, 3, 4, 2],
    "a token on an empty slot": [0, 1, 5, 2],
    "unsorted and split runs": [4, 2, 4, 0, 2, 3, 0, 4],
    "long prefill next to decodes": [4] * LONG + [0, -1, 2, 3],
    "two prefills": [2] * 20 + [-1] * 3 + [4] * 33,
    "T=1": [3],
    "T=1 base only": [-1],
}


def _lora_weights(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """a: [S, r_max, in]; b: [S, out, r_max] stored transposed as the slot table stores it."""
    g = torch.Generator().manual_seed(0)
    r_max = max(RANKS)
    a = torch.zeros(len(RANKS), r_max, N_IN)
    b = torch.zeros(len(RANKS), N_OUT, r_max)
    for s, r in enumerate(RANKS):
        a[s, :r] = torch.randn(r, N_IN, generator=g) / N_IN**0.5
        b[s, :, :r] = torch.randn(N_OUT, r, generator=g) / max(r, 1) ** 0.5
    b_t = b.transpose(1, 2).contiguous().to(dtype).to(device).transpose(1, 2)  # [S, out, r_max] view
    return a.to(dtype).to(device), b_t


def lora_case(slots: list[int], dtype: torch.dtype, device: torch.device, split_k: int | None = None) -> None:
    from loraserve.adapters.lora_backends import ReferenceBackend, TritonBackend
    from loraserve.adapters.lora_backends import triton_kernels as kernels

    a, b = _lora_weights(dtype, device)
    g = torch.Generator().manual_seed(len(slots))
    x = torch.randn(len(slots), N_IN, generator=g).to(dtype).to(device)  # [T, in]
    y0 = torch.randn(len(slots), N_OUT, generator=g).to(dtype).to(device)  # [T, out]: the base output
    backend = TritonBackend(device)
    plan = backend.plan(slots, RANKS)
    y = y0.clone()
    if split_k is None:
        backend.apply(y, x, a, b, plan)
    else:
        # h's planes hold the shrink's partial sums: garbage first, so that each must be written
        h = torch.full((split_k, len(plan.groups.order), plan.rank), float("nan"), device=device)
        groups = (plan.meta, plan.order, plan.num_groups, plan.max_count)
        kernels.lora_shrink(x, a, h, *groups, plan.rank)
        kernels.lora_expand(h, b, y, *groups)

    reference = ReferenceBackend(torch.device("cpu"))
    expected = y0.double().cpu()
    f64 = [t.double().cpu() for t in (x, a, b)]
    reference.apply(expected, *f64, reference.plan(slots, RANKS))
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double().cpu(), expected, rtol=rtol, atol=atol)
    base = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(y[base], y0[base]), "base-only tokens were changed"


# --- paged attention ----------------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, BLOCK, BLOCKS = 4, 2, 16, 16, 24
# Each sequence of a step as (tokens already in the cache, new tokens this step): one new token
# after a past is a decode; no past is a first prefill chunk; both is a later chunk.
ATTENTION_STEPS: dict[str, list[tuple[int, int]]] = {
    "decode": [(1, 1), (16, 1), (40, 1), (63, 1)],
    "prefill chunks": [(0, 20), (30, 19), (0, 1)],
    "mixed step": [(5, 1), (0, 37), (47, 1), (16, 16), (2, 1)],
}


def _attention_step(steps: list[tuple[int, int]], device: torch.device):
    """The step's AttentionMetadata (as the runner builds it) over scattered random block tables."""
    from loraserve.engine.attention import AttentionMetadata, PrefillChunk

    g = torch.Generator().manual_seed(len(steps))
    free = torch.randperm(BLOCKS, generator=g).tolist()
    tables = []
    for past, new in steps:
        need = -(-(past + new) // BLOCK)
        tables.append([free.pop() for _ in range(need)])
    rows: list[int] = []
    for (past, new), table in zip(steps, tables):
        rows += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(past, past + new)]

    def row_table(table: list[int], context: int) -> torch.Tensor:
        return torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(context)], dtype=torch.long)

    def make(k_cache: torch.Tensor, v_cache: torch.Tensor) -> AttentionMetadata:
        meta = AttentionMetadata(k_cache, v_cache, torch.tensor(rows, dtype=torch.long, device=device))
        decode_index, decode_rows, decode_lengths = [], [], []
        start = 0
        for (past, new), table in zip(steps, tables):
            context = past + new
            if new == 1 and past > 0:
                decode_index.append(start)
                decode_rows.append(row_table(table, context))
                decode_lengths.append(context)
            elif past == 0:
                meta.prefills.append(PrefillChunk(start, new, context, None))
            else:
                meta.prefills.append(PrefillChunk(start, new, context, row_table(table, context).to(device)))
            start += new
        if decode_index:
            width = max(decode_lengths)
            padded = torch.zeros(len(decode_rows), width, dtype=torch.long)
            for i, r in enumerate(decode_rows):
                padded[i, : len(r)] = r
            lengths = torch.tensor(decode_lengths)
            meta.decode_tokens = torch.tensor(decode_index, device=device)
            meta.decode_rows = padded.to(device)
            meta.decode_lengths = lengths.to(device)
            meta.decode_mask = (torch.arange(width)[None, :] < lengths[:, None])[:, None, None, :].to(device)
        return meta

    return make, len(rows)


def attention_case(
    steps: list[tuple[int, int]], dtype: torch.dtype, device: torch.device, window: int | None = None
) -> None:
    from loraserve.engine.attention import paged_attention_forward
    from loraserve.engine.paged_attention import triton_paged_attention
    from loraserve.forward_context import ForwardContext, forward_context

    make, num_tokens = _attention_step(steps, device)
    g = torch.Generator().manual_seed(7)
    cache_shape = (1, BLOCKS * BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(cache_shape, generator=g)  # old contents: the past of each sequence
    v_cache = torch.randn(cache_shape, generator=g)
    query = torch.randn(1, HEADS, num_tokens, HEAD_DIM, generator=g)
    key = torch.randn(1, KV_HEADS, num_tokens, HEAD_DIM, generator=g)
    value = torch.randn(1, KV_HEADS, num_tokens, HEAD_DIM, generator=g)
    layer = SimpleNamespace(layer_idx=0)
    scaling = HEAD_DIM**-0.5

    # The reference: the SDPA path in float64 on CPU (it writes the new keys/values first).
    make_cpu = make if device.type == "cpu" else _attention_step(steps, torch.device("cpu"))[0]
    with forward_context(ForwardContext(make_cpu(k_cache.double(), v_cache.double()))):
        expected, _ = paged_attention_forward(
            layer, query.double(), key.double(), value.double(), None, scaling, sliding_window=window
        )

    # The kernel on the same step, after the same cache writes.
    meta = make(k_cache.to(dtype).to(device), v_cache.to(dtype).to(device))
    k_layer, v_layer = meta.k_cache[0], meta.v_cache[0]
    new_k = key[0].transpose(0, 1).to(dtype).to(device)
    new_v = value[0].transpose(0, 1).to(dtype).to(device)
    k_layer.index_copy_(0, meta.cache_rows, new_k)
    v_layer.index_copy_(0, meta.cache_rows, new_v)
    q = query[0].to(dtype).to(device)  # [H, T, D]
    out = triton_paged_attention(meta.paged_plan(), q, k_layer, v_layer, scaling, window)  # [T, H, D]
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double().cpu(), expected[0].cpu(), rtol=rtol, atol=atol)


# --- the registry -------------------------------------------------------------------------------


def cases() -> dict[str, Callable[[torch.device], None]]:
    """Every case by name, as a function of the device."""
    found: dict[str, Callable[[torch.device], None]] = {}
    for dname, dtype in DTYPES.items():
        for name, slots in LORA_SLOTS.items():
            found[f"lora {name} {dname}"] = lambda d, s=slots, t=dtype: lora_case(s, t, d)
        found[f"lora split-K shrink {dname}"] = lambda d, t=dtype: lora_case(
            LORA_SLOTS["unsorted and split runs"], t, d, split_k=3
        )
        for name, steps in ATTENTION_STEPS.items():
            found[f"attention {name} {dname}"] = lambda d, s=steps, t=dtype: attention_case(s, t, d)
        found[f"attention sliding window {dname}"] = lambda d, t=dtype: attention_case(
            ATTENTION_STEPS["mixed step"], t, d, window=8
        )
    return found


def run_case(name: str, device: torch.device) -> None:
    cases()[name](device)


def interpreter_results(prefix: str) -> dict[str, str | None]:
    """Runs the cases named PREFIX... under Triton's interpreter in a subprocess: {case: None | error}."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.triton_cases", prefix],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(prefix: str) -> None:
    """Runs the cases named PREFIX... on CPU under Triton's interpreter; prints {case: null | error}."""
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    torch.set_num_threads(1)
    results: dict[str, str | None] = {}
    for name, case in cases().items():
        if name.startswith(prefix):
            try:
                case(torch.device("cpu"))
                results[name] = None
            except Exception:  # noqa: BLE001 - reported to the test as text
                results[name] = traceback.format_exc()
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
