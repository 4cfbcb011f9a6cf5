"""Paged attention in one Triton kernel: keys and values are read through each sequence's row table
inside the kernel, never gathered into a per-step copy of the context.

`loraserve.engine.attention.paged_attention_forward` writes the step's new keys/values into the
cache, then, on CUDA (where triton imports), hands the step to `triton_paged_attention`; on the CPU
it keeps its SDPA-over-a-gather path, which is also the reference the kernel is tested against
(under Triton's interpreter in CI, on CUDA in the GPU check).

A step's sequences come in two launches of the same kernel, each one varlen call:

- decode: one query token per sequence, tile = one sequence (BLOCK_Q = 1);
- prefill: every chunk of the step, cut into tiles of BLOCK_Q query tokens (a chunk's own new
  keys are already in the cache, so a chunk with no past reads them from there too).

`PagedPlan` (built once per step from the step's `AttentionMetadata`, then cached on it) holds, per
launch, the row table [B, max_ctx] (cache row of each position of each sequence, from its block
table), per sequence the first query token, query count and context length, and per tile its
sequence and first query. Every layer reuses it.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loraserve.engine.attention import AttentionMetadata

PREFILL_BLOCK_Q = 16  # query tokens per prefill tile


@functools.cache
def kernel_available(device_type: str) -> bool:
    """True where the Triton kernel can run: on CUDA when triton imports."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Launch:
    """One varlen launch: its sequences and tiles."""

    rows: torch.Tensor  # [B, max_ctx] cache row of each position (int64)
    seqs: torch.Tensor  # [3, B] int32: first query token, query count, context length
    tiles: torch.Tensor  # [2, NT] int32: sequence, first query of each tile
    block_q: int


@dataclass(frozen=True)
class PagedPlan:
    """The step's launches (decode, prefill), built once per step from its attention metadata."""

    decode: Launch | None
    prefill: Launch | None


def build_plan(meta: AttentionMetadata) -> PagedPlan:
    """The kernel's view of a step: decode sequences as they are, prefill chunks with row tables.

    Decode: the runner's `decode_rows` [Bd, max_ctx] is the row table as it is, and the sequence
    table is stacked from its device tensors (no copy back to the host, nothing waits on the GPU).
    Prefill: a chunk with a past reads `chunk.rows` [context]; one without reads its own new rows
    of `cache_rows`; its tiles come from the host-side chunk list.
    """
    decode = None
    if meta.decode_tokens is not None:
        tokens = meta.decode_tokens.to(torch.int32)  # [Bd]
        index = torch.arange(tokens.shape[0], dtype=torch.int32, device=tokens.device)
        seqs = torch.stack([tokens, torch.ones_like(tokens), meta.decode_lengths.to(torch.int32)])
        decode = Launch(meta.decode_rows, seqs, torch.stack([index, torch.zeros_like(index)]), 1)
    prefill = None
    if meta.prefills:
        device = meta.cache_rows.device
        width = max(chunk.context for chunk in meta.prefills)
        rows = torch.zeros(len(meta.prefills), width, dtype=torch.long, device=device)
        for b, chunk in enumerate(meta.prefills):
            if chunk.rows is None:
                rows[b, : chunk.length] = meta.cache_rows[chunk.start : chunk.start + chunk.length]
            else:
                rows[b, : chunk.context] = chunk.rows
        table = [[c.start for c in meta.prefills], [c.length for c in meta.prefills]]
        table.append([c.context for c in meta.prefills])
        tiles = [
            (b, q0) for b, chunk in enumerate(meta.prefills) for q0 in range(0, chunk.length, PREFILL_BLOCK_Q)
        ]
        prefill = Launch(
            rows,
            torch.tensor(table, dtype=torch.int32).to(device),
            torch.tensor(tiles, dtype=torch.int32).T.contiguous().to(device),
            PREFILL_BLOCK_Q,
        )
    return PagedPlan(decode, prefill)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def triton_paged_attention(
    plan: PagedPlan,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """q: [H, T, D] (the step's queries), k_cache/v_cache: [rows, KVH, D] -> out [T, H, D]."""
    import triton.language as tl

    from loraserve.adapters.lora_backends.triton_kernels import compute_dtype

    heads, num_tokens, head_dim = q.shape
    # The kernel reads head_dim elements contiguously (true of transformers' projections and of
    # the cache); a layout that is not gets one copy rather than a wrong read.
    if q.stride(2) != 1:
        q = q.contiguous()
    if k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("the paged KV cache must be contiguous in head_dim")
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = q.new_empty(num_tokens, heads, head_dim)
    scale = scaling if scaling is not None else head_dim**-0.5
    from loraserve.engine.paged_attention_kernel import paged_attention_kernel as kernel

    precision = "ieee" if q.dtype == torch.float32 else None
    for launch in (plan.decode, plan.prefill):
        if launch is None:
            continue
        group_pad = _pow2(group)
        block_m = max(16, launch.block_q * group_pad)
        num_tiles = launch.tiles.shape[1]
        kernel[(num_tiles, kv_heads)](
            q,
            k_cache,
            v_cache,
            out,
            launch.rows,
            launch.seqs,
            launch.tiles,
            launch.seqs.shape[1],
            num_tiles,
            float(scale),
            int(sliding_window or 0),
            q.stride(1),
            q.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            v_cache.stride(0),
            v_cache.stride(1),
            out.stride(0),
            out.stride(1),
            launch.rows.stride(0),
            GROUP=group,
            GROUP_PAD=group_pad,
            BLOCK_Q=launch.block_q,
            BLOCK_M=block_m,
            BLOCK_N=32 if launch.block_q == 1 else 64,
            HEAD_DIM=head_dim,
            D_PAD=max(16, _pow2(head_dim)),
            COMPUTE=compute_dtype(q.dtype) if q.dtype in (torch.float16, torch.bfloat16) else tl.float32,
            PRECISION=precision,
        )
    return out
