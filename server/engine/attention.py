"""Attention over the paged KV cache, registered as a transformers attention implementation.

The model's own attention modules (Llama, Mistral, Qwen2...) project q/k/v and apply rotary
embeddings; they then call this function through transformers' `AttentionInterface`. It
writes the step's new keys/values into their cache rows and attends, per sequence, over the
rows of its block table. The step's `AttentionMetadata` reaches it through the forward context
that the runner sets once per step (`loraserve.forward_context`), so module signatures do not
change.

"Row" here is a KV cache row (block * block_size + offset); adapter slots are another thing,
and only the LoRA layers see them.

A training pass of the Training service (loraserve.training) runs through the same function
with a forward context that has no attention metadata: it gets dense causal attention over its
padded batch (`dense_training_attention`), with no KV cache read or written.

Batch layout: the runner flattens all sequences' new tokens into one row [1, T]. On CUDA (where
triton imports) the step goes to `loraserve.engine.paged_attention`: one Triton kernel reads K/V
through the row tables, decode tokens in one launch and all prefill chunks in another. Elsewhere,
and as that kernel's reference: decode tokens are attended in one padded SDPA call over their
gathered context, prefill chunks one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loraserve.engine.paged_attention import PagedPlan, build_plan, kernel_available, triton_paged_attention
from loraserve.forward_context import current_forward_context

ATTENTION_NAME = "loraserve_paged"


@dataclass
class PrefillChunk:
    """One sequence's chunk of new tokens [start, start + length) in the flattened batch."""

    start: int
    length: int
    context: int  # tokens of the sequence in the cache after this step (past + chunk)
    rows: torch.Tensor | None  # [context] cache rows to attend over; None: no past, use the chunk itself


@dataclass
class AttentionMetadata:
    """What the attention layers need for one forward step."""

    k_cache: torch.Tensor  # [layers, rows, kv_heads, head_dim]
    v_cache: torch.Tensor
    cache_rows: torch.Tensor  # [T] cache row of each new token, where its key/value are written
    decode_tokens: torch.Tensor | None = None  # [Bd] batch index of each decode token
    decode_rows: torch.Tensor | None = None  # [Bd, max_ctx] cache rows per decode sequence
    decode_lengths: torch.Tensor | None = None  # [Bd] context length per decode sequence
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, max_ctx] True where attended
    prefills: list[PrefillChunk] = field(default_factory=list)
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    _paged_plan: PagedPlan | None = None  # the Triton kernel's launches, built by the first layer

    def paged_plan(self) -> PagedPlan:
        """The step's launches of the paged-attention kernel, built once and shared by all layers."""
        if self._paged_plan is None:
            self._paged_plan = build_plan(self)
        return self._paged_plan

    def decode_mask_for(self, window: int | None) -> torch.Tensor:
        """The decode mask, narrowed to the last `window` keys for sliding-window layers."""
        if not window:
            return self.decode_mask
        if window not in self._window_masks:
            positions = torch.arange(self.decode_rows.shape[1], device=self.decode_rows.device)
            recent = positions[None, :] > (self.decode_lengths[:, None] - 1 - window)
            self._window_masks[window] = self.decode_mask & recent[:, None, None, :]
        return self._window_masks[window]


def get_metadata() -> AttentionMetadata:
    """The attention metadata of the step being run (set by the runner's forward context)."""
    context = current_forward_context()
    if context is None or context.attention is None:
        raise RuntimeError("paged attention called outside an engine step")
    return context.attention


def _chunk_mask(length: int, context: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[length, context] True where query i (at position context-length+i) may see key j."""
    query_pos = torch.arange(context - length, context, device=device)[:, None]
    key_pos = torch.arange(context, device=device)[None, :]
    mask = key_pos <= query_pos
    if window:
        mask &= key_pos > query_pos - window
    return mask


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """query: [1, H, T, D]; key/value: [1, KVH, T, D] -> ([1, T, H, D], None)."""
    context = current_forward_context()
    if context is not None and context.attention is None and context.training is not None:
        return dense_training_attention(query, key, value, attention_mask, scaling, sliding_window), None
    meta = get_metadata()
    layer = module.layer_idx
    k_cache, v_cache = meta.k_cache[layer], meta.v_cache[layer]  # [rows, KVH, D]
    new_k = key[0].transpose(0, 1)  # [T, KVH, D]
    new_v = value[0].transpose(0, 1)
    k_cache.index_copy_(0, meta.cache_rows, new_k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.cache_rows, new_v.to(v_cache.dtype))

    q = query[0]  # [H, T, D]
    if kernel_available(q.device.type):  # CUDA: no per-step copy of the context
        out = triton_paged_attention(meta.paged_plan(), q, k_cache, v_cache, scaling, sliding_window)
        return out.unsqueeze(0), None
    num_tokens = q.shape[1]
    out = q.new_empty(num_tokens, q.shape[0], q.shape[2])  # [T, H, D]

    if meta.decode_tokens is not None:
        qd = q.index_select(1, meta.decode_tokens).transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, D]
        kd = k_cache[meta.decode_rows].permute(0, 2, 1, 3)  # [Bd, KVH, ctx, D]
        vd = v_cache[meta.decode_rows].permute(0, 2, 1, 3)
        od = F.scaled_dot_product_attention(
            qd,
            kd.to(qd.dtype),
            vd.to(qd.dtype),
            attn_mask=meta.decode_mask_for(sliding_window),
            scale=scaling,
            enable_gqa=True,
        )  # [Bd, H, 1, D]
        out.index_copy_(0, meta.decode_tokens, od.squeeze(2))

    for chunk in meta.prefills:
        s, n = chunk.start, chunk.length
        qc = q[:, s : s + n].unsqueeze(0)  # [1, H, n, D]
        if chunk.rows is None:
            kc, vc = key[:, :, s : s + n], value[:, :, s : s + n]  # [1, KVH, n, D]
        else:
            kc = k_cache.index_select(0, chunk.rows).transpose(0, 1).unsqueeze(0).to(qc.dtype)
            vc = v_cache.index_select(0, chunk.rows).transpose(0, 1).unsqueeze(0).to(qc.dtype)
        if chunk.rows is None and not (sliding_window and sliding_window < n):
            oc = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            mask = _chunk_mask(n, chunk.context, sliding_window, q.device)
            oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scaling, enable_gqa=True)
        out[s : s + n] = oc[0].transpose(0, 1)
    return out.unsqueeze(0), None


def dense_training_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """query: [B, H, T, D]; key/value: [B, KVH, T, D]; attention_mask: [B, 1, T, T] bool (True
    where attended: causal and not padding) -> [B, T, H, D]. Differentiable."""
    mask = attention_mask
    if sliding_window:
        length = query.shape[2]
        positions = torch.arange(length, device=query.device)
        recent = positions[None, :] > positions[:, None] - sliding_window  # [T, T]
        mask = recent if mask is None else mask & recent
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous()


def register() -> str:
    """Registers the function with transformers (idempotent) and returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
