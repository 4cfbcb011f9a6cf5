"""The Triton kernel of `loraserve.engine.paged_attention` (imported only where it runs: it imports
triton, which decides at its own import whether kernels are compiled or interpreted)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_attention_kernel(
    q_ptr,  # [T, H, D] (any strides)
    k_ptr,  # [rows, KVH, D] one layer's cache
    v_ptr,
    o_ptr,  # [T, H, D] contiguous
    rows_ptr,  # [B, max_ctx] cache row of each position of each sequence
    seq_ptr,  # [3, B] int32: first query token, query count, context length
    tile_ptr,  # [2, NT] int32: sequence, first query (within the sequence) of each tile
    num_seqs,
    num_tiles,
    scale,
    window,  # 0: no sliding window
    sq_t,
    sq_h,
    sk_r,
    sk_h,
    sv_r,
    sv_h,
    so_t,
    so_h,
    sr_b,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,  # BLOCK_Q * GROUP_PAD rounded up to 16
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online-softmax attention of one tile's queries (all heads of one KV head) over its sequence.

    Pseudo-code, program (tile, kvh):
        seq, q0 = tiles[tile]; qstart, qlen, ctx = seqs[seq]
        row m of the tile = query token q0 + m // GROUP_PAD, head kvh*GROUP + m % GROUP_PAD
        qpos[m] = ctx - qlen + q0 + m // GROUP_PAD         (absolute position of the query)
        for keys in blocks of BLOCK_N positions from the window's start to the tile's last qpos:
            k, v = cache[rows[seq, pos]]                    (gathered inside the kernel)
            s = q @ kᵀ · scale, masked to pos <= qpos (and pos > qpos - window)
            m_new = max(m, rowmax(s)); acc = acc·e^(m - m_new) + e^(s - m_new) @ v; l likewise
        out[query token, head] = acc / l
    """
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_ptr + tile)
    q0 = tl.load(tile_ptr + num_tiles + tile)
    qstart = tl.load(seq_ptr + seq)
    qlen = tl.load(seq_ptr + num_seqs + seq)
    ctx = tl.load(seq_ptr + 2 * num_seqs + seq)

    offs_m = tl.arange(0, BLOCK_M)
    qi = offs_m // GROUP_PAD
    hg = offs_m % GROUP_PAD
    valid = (qi < BLOCK_Q) & (q0 + qi < qlen) & (hg < GROUP)
    token = (qstart + q0 + qi).to(tl.int64)
    head = kvh * GROUP + hg
    qpos = ctx - qlen + q0 + qi  # [BLOCK_M]
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM

    q = tl.load(
        q_ptr + token[:, None] * sq_t + head[:, None] * sq_h + offs_d[None, :],
        mask=valid[:, None] & mask_d[None, :],
        other=0.0,
    ).to(COMPUTE)  # [BLOCK_M, D_PAD]

    first_pos = ctx - qlen + q0
    hi = tl.minimum(ctx, first_pos + BLOCK_Q)  # keys past the tile's last query are never needed
    lo = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0), 0)
    lo = (lo // BLOCK_N) * BLOCK_N

    # A finite "minus infinity": a row with no allowed key yet stays NaN-free (its alpha is 0 later).
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    row_base = rows_ptr + seq.to(tl.int64) * sr_b
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        mask_n = pos < hi
        rows = tl.load(row_base + pos, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + rows[:, None] * sk_r + kvh * sk_h + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(COMPUTE)), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        allowed = mask_n[None, :] & (pos[None, :] <= qpos[:, None])
        allowed = allowed & ((window == 0) | (pos[None, :] > qpos[:, None] - window))
        s = tl.where(allowed, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(allowed, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + rows[:, None] * sv_r + kvh * sv_h + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v.to(COMPUTE), input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        o_ptr + token[:, None] * so_t + head[:, None] * so_h + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=valid[:, None] & mask_d[None, :],
    )
