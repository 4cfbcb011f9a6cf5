"""KV cache sizing: the cache's shape for a model, and how many blocks the engine allocates; and
the byte budget of the adapter slots (`auto` slots), taken from the same free memory first.

One place for the arithmetic, used by the engine and by the benchmarks (which size the cache
to their workload instead of to free memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraserve.engine.kv_cache import KVCache


@dataclass(frozen=True)
class KVGeometry:
    """What one cached token holds per layer: K and V of [num_kv_heads, head_dim] each."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model_config: Any) -> KVGeometry:
        """From a Hugging Face config of the Llama family (GQA heads and explicit head_dim honoured)."""
        heads = model_config.num_attention_heads
        return cls(
            num_layers=model_config.num_hidden_layers,
            num_kv_heads=getattr(model_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(model_config, "head_dim", None) or model_config.hidden_size // heads,
        )

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return KVCache.bytes_per_block(self.num_layers, block_size, self.num_kv_heads, self.head_dim, dtype)


def available_memory(device: torch.device) -> int:
    """Free bytes on the device (CUDA) or available RAM (CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 1024**3


def kv_cache_blocks(
    geometry: KVGeometry,
    dtype: torch.dtype,
    block_size: int,
    budget_bytes: int,
    max_num_seqs: int,
    max_context_length: int,
) -> int:
    """Blocks that fit the budget, but no more than max_num_seqs full-context sequences can use."""
    useful = max_num_seqs * math.ceil(max_context_length / block_size)
    return max(1, min(budget_bytes // geometry.bytes_per_block(block_size, dtype), useful))


def kv_cache_budget(config: Any, device: torch.device) -> int:
    """The engine's KV budget in bytes: kv_cache_bytes when set, else a fraction of free memory."""
    return config.kv_cache_bytes or int(available_memory(device) * config.kv_cache_memory_fraction)


def adapter_memory_budget(config: Any, device: torch.device) -> int:
    """The adapter slots' budget in bytes: adapter_memory_bytes when set, else a fraction of free memory."""
    return config.adapter_memory_bytes or int(available_memory(device) * config.adapter_memory_fraction)
