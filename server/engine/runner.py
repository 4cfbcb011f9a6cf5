"""One forward pass over a ragged batch: prefill chunks and decode tokens, mixed adapters.

Uses the base model's own Hugging Face modules (embedding, rotary embedding, decoder layers,
final norm, output head) of any Llama-family causal LM (Llama, Mistral, Qwen2...). All
sequences' new tokens are flattened into one row [1, T]; attention goes through the paged
KV cache (loraserve.engine.attention); each adapted linear layer adds its token's adapter
(loraserve.adapters.layer). Both read the step's state from one forward context
(loraserve.forward_context) that the runner sets once per step: the attention metadata (cache
rows, block tables) and the LoRA backend's plan (each token's adapter slot).
"""

from __future__ import annotations

import torch
from torch import nn

from loraserve.adapters.layer import SlotTable
from loraserve.engine.attention import AttentionMetadata, PrefillChunk, register
from loraserve.engine.kv_cache import KVCache
from loraserve.engine.sequence import ScheduledSeq
from loraserve.errors import FailedPrecondition
from loraserve.forward_context import ForwardContext, forward_context


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.ModuleList, nn.Module, nn.Module]:
    """(embed_tokens, rotary_emb, layers, norm, lm_head) of a Llama-family causal LM."""
    body = getattr(model, "model", None)
    parts = [getattr(body, name, None) for name in ("embed_tokens", "rotary_emb", "layers", "norm")]
    head = getattr(model, "lm_head", None)
    if body is None or any(p is None for p in parts) or head is None:
        raise FailedPrecondition(
            f"{type(model).__name__} is not a Llama-family decoder (model.embed_tokens, rotary_emb, "
            "layers, norm and lm_head); the runner cannot serve it"
        )
    return parts[0], parts[1], parts[2], parts[3], head


class ModelRunner:
    """Runs the model for a scheduled batch and returns the logits of the sampled positions."""

    def __init__(self, model: nn.Module, kv: KVCache, slots: SlotTable | None, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.slots = slots
        self.device = device
        self.embed, self.rotary, self.layers, self.norm, self.lm_head = decoder_parts(model)
        model.config._attn_implementation = register()

    def _metadata(self, batch: list[ScheduledSeq], cache_rows: torch.Tensor) -> AttentionMetadata:
        bs = self.kv.block_size
        meta = AttentionMetadata(self.kv.k, self.kv.v, cache_rows)
        decode_index, decode_tables, decode_lengths = [], [], []
        start = 0
        for item in batch:
            seq, n = item.seq, item.num_new
            context = seq.num_computed + n
            if n == 1 and seq.num_computed > 0:
                decode_index.append(start)
                decode_tables.append(seq.block_table)
                decode_lengths.append(context)
            elif seq.num_computed == 0:
                meta.prefills.append(PrefillChunk(start, n, context, None))
            else:
                table = torch.tensor(seq.block_table, dtype=torch.long)
                rows = (table[:, None] * bs + torch.arange(bs)).flatten()[:context]
                meta.prefills.append(PrefillChunk(start, n, context, rows.to(self.device)))
            start += n
        if decode_index:
            width = max(len(t) for t in decode_tables)
            tables = torch.zeros(len(decode_tables), width, dtype=torch.long)
            for i, table in enumerate(decode_tables):
                tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)
            max_ctx = max(decode_lengths)
            rows = (tables[:, :, None] * bs + torch.arange(bs)).view(len(decode_tables), -1)[:, :max_ctx]
            lengths = torch.tensor(decode_lengths, dtype=torch.long)
            mask = torch.arange(max_ctx)[None, :] < lengths[:, None]
            meta.decode_tokens = torch.tensor(decode_index, dtype=torch.long, device=self.device)
            meta.decode_rows = rows.to(self.device)
            meta.decode_lengths = lengths.to(self.device)
            meta.decode_mask = mask[:, None, None, :].to(self.device)
        return meta

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Runs the batch (ordered so one slot's tokens are contiguous); returns [n_sampled, vocab] fp32."""
        bs = self.kv.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []  # KV cache row of each new token
        slot_of_token: list[int] = []  # adapter slot of each new token (-1: base model)
        sample_index: list[int] = []
        for item in batch:
            seq, n = item.seq, item.num_new
            first = seq.num_computed
            input_ids.extend(seq.tokens(first, first + n))
            positions.extend(range(first, first + n))
            table = seq.block_table
            rows.extend(table[p // bs] * bs + p % bs for p in range(first, first + n))
            slot_of_token.extend([seq.slot] * n)
            if item.samples:
                sample_index.append(len(input_ids) - 1)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)[None]  # [1, T]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[None]  # [1, T]
        cache_rows = torch.tensor(rows, dtype=torch.long, device=self.device)  # [T]
        lora = self.slots.plan(slot_of_token) if self.slots is not None else None
        with forward_context(ForwardContext(self._metadata(batch, cache_rows), lora)):
            return self._forward(ids, pos, sample_index)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, sample_index: list[int]) -> torch.Tensor:
        """ids, pos: [1, T] -> logits [n_sampled, vocab] fp32 of the tokens at `sample_index`."""
        hidden = self.embed(ids)  # [1, T, H]
        position_embeddings = self.rotary(hidden, pos)
        for layer in self.layers:
            out = layer(
                hidden, attention_mask=None, position_ids=pos, position_embeddings=position_embeddings
            )
            hidden = out[0] if isinstance(out, tuple) else out  # older layers return (hidden, ...)
        if not sample_index:
            return torch.empty(0, 0)
        last = hidden[0, torch.tensor(sample_index, device=self.device)]  # [n_sampled, H]
        logits = self.lm_head(self.norm(last))
        return logits.float()
