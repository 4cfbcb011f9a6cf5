"""Paged KV cache: a pool of fixed-size blocks and a block table per sequence.

`BlockManager` is pure bookkeeping (which blocks are free, which a sequence holds);
`KVCache` owns the tensors. Token at position p of a sequence lives in cache row
`block_table[p // block_size] * block_size + p % block_size` of every layer.
"""

from __future__ import annotations

import math
from collections import deque

import torch


class BlockManager:
    """Free-list of KV blocks. Blocks go back on finish, cancel, error and preemption."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def extra_blocks(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks a sequence holding `block_table` needs to store `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.extra_blocks(block_table, num_tokens) <= len(self._free)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Appends free blocks to the table until it holds `num_tokens` tokens."""
        need = self.extra_blocks(block_table, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"KV cache out of blocks: need {need}, have {len(self._free)}")
        for _ in range(need):
            block_table.append(self._free.popleft())

    def release(self, block_table: list[int]) -> None:
        """Returns every block of the table to the pool and empties the table."""
        self._free.extend(block_table)
        block_table.clear()


class KVCache:
    """Key and value tensors of all layers: [layers, blocks * block_size, kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element
