"""Triton kernels of the `triton` LoRA backend: a grouped shrink and a grouped expand-and-add.

For a step whose adapted tokens are grouped by slot (`SlotGroups`: `order` sorted by slot, and per
group g its slot, start in `order`, token count and rank), the LoRA term of one layer is

    h[i] = x[order[i]] @ A[slot(i)]ᵀ          # shrink:  [N, r]   (fp32 accumulation, fp32 h)
    y[order[i]] += h[i] @ B[slot(i)]ᵀ         # expand:  [N, out] (the scale is folded into B)

For decode-sized groups the shrink's reduction is split over SPLIT_K programs (a few token blocks
would leave most SMs idle): each writes its partial sum to its own plane of h [SPLIT_K, N, r],
and the expand adds the planes as it loads h. No atomics and no zeroing launch, and the result
does not depend on the order programs run in.

Both kernels run one program per (token block of one group, output tile, group): the structure of
punica's SGMV, S-LoRA's and vLLM's grouped LoRA kernels and SGLang's chunked SGMV. A program reads
its group's slot, start, count and rank from device tensors, gathers its tokens' rows through
`order`, and returns at once when its token block or rank tile lies past the group's count or the
adapter's own rank. Mixed ranks are padded to r_max in the slot buffers; a rank-8 adapter in a
rank-64 table costs a rank-8 adapter's work (skipped rank tiles in the shrink, a rank-bounded loop
in the expand). Base-only tokens (slot -1) are in no group and are never touched.

Grids are sized from the step's plan (groups and the largest group), never from tensor values, so
a layer makes no data-dependent Python decision: a step's applies replay from a CUDA graph (tested
on CUDA). Serving steps from graphs needs the plan in static buffers and grids padded to fixed
buckets, which the kernels allow as they are (programs past a group's count exit).

Dtypes: x, A, B and y share one dtype (fp32, fp16 or bf16). Dot products accumulate in fp32;
`COMPUTE` is the dtype the operands are cast to before `tl.dot` (their own dtype on a GPU, fp32
under Triton's CPU interpreter, whose bf16 `dot` is not exact) and fp32 dots use IEEE precision
(no TF32), so the kernels match the torch reference to the input dtype's rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter: TRITON_INTERPRET=1 was set when the
    kernels below were decorated (triton.jit reads it then), so they are interpreted functions."""
    return type(lora_shrink_kernel).__name__ == "InterpretedFunction"


def compute_dtype(dtype: torch.dtype) -> tl.dtype:
    """What `tl.dot` operands are cast to: fp32 in the interpreter, else the tensors' own dtype."""
    return tl.float32 if interpreting() else _DTYPES[dtype]


@triton.jit
def lora_shrink_kernel(
    x_ptr,  # [T, in]
    a_ptr,  # [S, r_max, in]
    h_ptr,  # [SPLIT_K, N, r] fp32 partial sums; row i belongs to token order[i]
    order_ptr,  # [N] int32 token indices sorted by slot
    meta_ptr,  # [4, G] int32 rows: slot, start (first row in order / h), count, rank of each group
    num_groups,  # G
    in_features,
    sx_t,
    sx_k,
    sa_s,
    sa_r,
    sa_k,
    sh_s,
    sh_t,
    sh_r,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """h[start+m, r] (+)= Σ_k x[order[start+m], k] · A[slot, r, k] for one (token block, rank tile, group).

    Pseudo-code, program (pid_mk, pid_r, g):
        m_block, k_split = divmod(pid_mk, SPLIT_K)
        if m_block*BLOCK_M >= count[g] or pid_r*BLOCK_R >= rank[g]: return
        rows = start[g] + m_block*BLOCK_M + [0, BLOCK_M)        (masked to the group's count)
        tokens = order[rows]; r = pid_r*BLOCK_R + [0, BLOCK_R)  (masked to the adapter's rank)
        acc[BLOCK_M, BLOCK_R] = 0 (fp32)
        for k in k_split*BLOCK_K, step SPLIT_K*BLOCK_K, below in_features:
            acc += x[tokens, k:k+BLOCK_K] @ A[slot, r, k:k+BLOCK_K]ᵀ
        h[k_split, rows, r] = acc   (this program's partial sum)
    """
    pid_mk = tl.program_id(0)
    pid_r = tl.program_id(1)
    g = tl.program_id(2)
    m_block = pid_mk // SPLIT_K
    k_split = pid_mk % SPLIT_K
    count = tl.load(meta_ptr + 2 * num_groups + g)
    rank = tl.load(meta_ptr + 3 * num_groups + g)
    if m_block * BLOCK_M >= count:
        return
    if pid_r * BLOCK_R >= rank:  # the adapter's own rank ends before this tile (chunked SGMV)
        return
    slot = tl.load(meta_ptr + g).to(tl.int64)
    start = tl.load(meta_ptr + num_groups + g)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    rows = start + offs_m
    tokens = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)  # gather through the sort
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + tokens[:, None] * sx_t  # [BLOCK_M, 1]
    a_rows = a_ptr + slot * sa_s + offs_r[:, None] * sa_r  # [BLOCK_R, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_split * BLOCK_K, in_features, SPLIT_K * BLOCK_K):
        k = k0 + offs_k
        mask_k = k < in_features
        xs = tl.load(x_rows + k[None, :] * sx_k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        as_ = tl.load(a_rows + k[None, :] * sa_k, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(xs.to(COMPUTE), tl.trans(as_.to(COMPUTE)), input_precision=PRECISION)

    h_ptrs = h_ptr + k_split * sh_s + rows[:, None] * sh_t + offs_r[None, :] * sh_r
    tl.store(h_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def lora_expand_kernel(
    h_ptr,  # [SPLIT_K, N, r] fp32 partial sums of the shrink
    b_ptr,  # [S, out, r_max]
    y_ptr,  # [T, out]
    order_ptr,
    meta_ptr,
    num_groups,
    out_features,
    sh_s,
    sh_t,
    sh_r,
    sb_s,
    sb_n,
    sb_r,
    sy_t,
    sy_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y[order[start+m], n] += Σ_{r<rank} h[start+m, r] · B[slot, n, r], one (token block, out tile, group).

    Pseudo-code, program (m_block, pid_n, g):
        if m_block*BLOCK_M >= count[g]: return
        rows, tokens as in the shrink; n = pid_n*BLOCK_N + [0, BLOCK_N)
        acc[BLOCK_M, BLOCK_N] = 0 (fp32)
        for k in 0, step BLOCK_K, below rank[g]:       # the adapter's rank, not r_max
            hk = Σ_s h[s, rows, k:k+BLOCK_K], rounded to B's dtype
            acc += hk @ B[slot, n, k:k+BLOCK_K]ᵀ
        y[tokens, n] = y[tokens, n] + acc             (each (token, n) owned by one program)
    """
    m_block = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    count = tl.load(meta_ptr + 2 * num_groups + g)
    if m_block * BLOCK_M >= count:
        return
    rank = tl.load(meta_ptr + 3 * num_groups + g)
    slot = tl.load(meta_ptr + g).to(tl.int64)
    start = tl.load(meta_ptr + num_groups + g)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    rows = start + offs_m
    tokens = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_features
    offs_k = tl.arange(0, BLOCK_K)

    h_rows = h_ptr + rows[:, None] * sh_t  # [BLOCK_M, 1]
    b_rows = b_ptr + slot * sb_s + offs_n[:, None] * sb_n  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):  # rank-bounded: chunks past the adapter's rank are skipped
        k = k0 + offs_k
        mask_k = k < rank
        h_mask = mask_m[:, None] & mask_k[None, :]
        hs = tl.load(h_rows + k[None, :] * sh_r, mask=h_mask, other=0.0)
        for split in tl.static_range(1, SPLIT_K):  # the shrink's other partial sums
            hs += tl.load(h_rows + split * sh_s + k[None, :] * sh_r, mask=h_mask, other=0.0)
        bs = tl.load(b_rows + k[None, :] * sb_r, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        # h is rounded to the model dtype first, as the unfused h = x @ Aᵀ would be.
        hs = hs.to(b_ptr.dtype.element_ty)
        acc += tl.dot(hs.to(COMPUTE), tl.trans(bs.to(COMPUTE)), input_precision=PRECISION)

    y_ptrs = y_ptr + tokens[:, None] * sy_t + offs_n[None, :] * sy_n
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(max(n, 1)))


def token_block(max_count: int) -> int:
    """Tokens per program: 16 for decode-sized groups (tl.dot's smallest tile), up to 64 for prefill."""
    return min(64, _pow2_at_least(max_count, 16))


def shrink_block_k() -> int:
    return 32 if interpreting() else 64


def shrink_split_k(max_count: int, in_features: int) -> int:
    """How many programs share one token block's shrink reduction: up to 8 for decode-sized
    groups (few token blocks would leave most of a GPU's SMs idle), 1 for prefill and in the
    interpreter (where it only costs time)."""
    if interpreting() or max_count > 64:
        return 1
    return max(1, min(8, in_features // (4 * shrink_block_k())))


def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    h: torch.Tensor,
    meta: torch.Tensor,
    order: torch.Tensor,
    num_groups: int,
    max_count: int,
    rank: int,
) -> None:
    """Launches the shrink: h[s, i, :rank] = partial sums of x[order[i]] @ A[slot]ᵀ, s < SPLIT_K.

    x: [T, in], a: [S, r_max, in], h: [SPLIT_K, N, rank] fp32 (SPLIT_K = h.shape[0], see
    `shrink_split_k`), meta: [4, G] int32 contiguous (rows slot/start/count/rank), order: [N] int32.
    """
    in_features = x.shape[1]
    split = h.shape[0]
    block_m, block_r, block_k = token_block(max_count), 16, shrink_block_k()
    grid = (triton.cdiv(max_count, block_m) * split, max(1, triton.cdiv(rank, block_r)), num_groups)
    lora_shrink_kernel[grid](
        x,
        a,
        h,
        order,
        meta,
        num_groups,
        in_features,
        x.stride(0),
        x.stride(1),
        a.stride(0),
        a.stride(1),
        a.stride(2),
        h.stride(0),
        h.stride(1),
        h.stride(2),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        SPLIT_K=split,
        COMPUTE=compute_dtype(x.dtype),
        PRECISION="ieee" if x.dtype == torch.float32 else None,
    )


def lora_expand(
    h: torch.Tensor,
    b: torch.Tensor,
    y: torch.Tensor,
    meta: torch.Tensor,
    order: torch.Tensor,
    num_groups: int,
    max_count: int,
) -> None:
    """Launches the expand: y[order[i]] += (Σ_s h[s, i, :rank]) @ B[slot]ᵀ for every grouped token i.

    h: [SPLIT_K, N, rank] fp32 (the shrink's), b: [S, out, r_max] (any strides), y: [T, out].
    """
    out_features = y.shape[1]
    block_m = token_block(max_count)
    block_n = 64 if interpreting() or max_count <= 16 else 128
    grid = (triton.cdiv(max_count, block_m), triton.cdiv(out_features, block_n), num_groups)
    lora_expand_kernel[grid](
        h,
        b,
        y,
        order,
        meta,
        num_groups,
        out_features,
        h.stride(0),
        h.stride(1),
        h.stride(2),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        y.stride(0),
        y.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=16,
        SPLIT_K=h.shape[0],
        COMPUTE=compute_dtype(y.dtype),
        PRECISION="ieee" if y.dtype == torch.float32 else None,
    )
