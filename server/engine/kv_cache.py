"""Paged KV cache: a pool of fixed-size blocks and a block table per sequence.

`BlockManager` is pure bookkeeping (which blocks are free, cached or held, by how many
sequences); `KVCache` owns the tensors. Token at position p of a sequence lives in cache row
`block_table[p // block_size] * block_size + p % block_size` of every layer.

Blocks are reference-counted so that sequences with the same prefix share them (prefix
caching, loraserve.engine.prefix_cache). A block whose count drops to zero goes back to the
free list, or, when it holds a full block of known content (it has a `BlockKey`), to the
evictable cache, oldest first, where a later sequence can find it by its hash until its
memory is needed. Allocation takes free blocks first, then evicts cached ones.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockKey:
    """What a full block holds: its chained hash, its tokens (compared on every hit, so that a
    hash collision can never serve another prefix's KV), and whose they are (the adapter id,
    '' for the base model), for dropping an adapter's blocks when it is unloaded or reloaded."""

    hash: bytes
    tokens: tuple[int, ...]
    owner: str


class BlockManager:
    """Ref-counted KV blocks: a free list, an evictable cache of full blocks, a hash index."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))  # nothing worth keeping
        self._cached: OrderedDict[int, None] = OrderedDict()  # count 0, content kept; oldest first
        self._refs = [0] * num_blocks
        self._keys: list[BlockKey | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self.evictions = 0  # cached blocks whose content was dropped (reused, or made unreachable)

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take now: free ones and evictable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Blocks no sequence holds whose content stays findable until their memory is needed."""
        return len(self._cached)

    @property
    def num_held(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def extra_blocks(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks a sequence holding `block_table` needs to store `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.extra_blocks(block_table, num_tokens) <= self.num_free

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Appends new blocks to the table until it holds `num_tokens` tokens."""
        need = self.extra_blocks(block_table, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"KV cache out of blocks: need {need}, have {self.num_free}")
        for _ in range(need):
            block_table.append(self._allocate())

    def release(self, block_table: list[int]) -> None:
        """Drops the table's references and empties it; a block nobody holds is freed or cached.

        The last blocks are cached first, so that they are evicted before the prefix they extend
        (a prefix serves more requests than any one continuation of it).
        """
        for block in reversed(block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._keys[block] is None:
                    self._free.append(block)
                else:
                    self._cached[block] = None
        block_table.clear()

    # ------------------------------------------------------------------ prefix caching
    def lookup(self, block_hash: bytes, tokens: tuple[int, ...]) -> int | None:
        """The block holding exactly these tokens after this chain, held or cached; None if none."""
        block = self._by_hash.get(block_hash)
        if block is None:
            return None
        key = self._keys[block]
        return block if key is not None and key.tokens == tokens else None

    def can_take(self, hits: list[int], num_tokens: int) -> bool:
        """Whether a sequence can take the cached `hits` and then grow to `num_tokens` tokens."""
        revived = sum(1 for block in hits if self._refs[block] == 0)
        return self.blocks_for(num_tokens) - len(hits) <= self.num_free - revived

    def take(self, block_table: list[int], hits: list[int]) -> None:
        """Appends blocks found by `lookup` to an empty table, one reference each."""
        for block in hits:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
            block_table.append(block)

    def publish(self, block: int, key: BlockKey) -> None:
        """Makes a held block findable by its key once its tokens are all computed.

        A block already findable keeps its key, and a key already served by another block keeps
        that block: the newer copy stays private and is freed when released.
        """
        if self._keys[block] is not None or key.hash in self._by_hash:
            return
        self._keys[block] = key
        self._by_hash[key.hash] = block

    def forget(self, owners: Iterable[str]) -> int:
        """Makes every block of these owners unfindable; those no sequence holds are freed at once
        (evicted first). Returns how many cached blocks were dropped."""
        gone = set(owners)
        dropped = 0
        for block, key in enumerate(self._keys):
            if key is None or key.owner not in gone:
                continue
            self._unkey(block)
            if self._refs[block] == 0:
                del self._cached[block]
                self._free.appendleft(block)
                dropped += 1
        self.evictions += dropped
        return dropped

    def _allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._cached.popitem(last=False)  # the oldest cached block
            self._unkey(block)
            self.evictions += 1
        self._refs[block] = 1
        return block

    def _unkey(self, block: int) -> None:
        key = self._keys[block]
        self._keys[block] = None
        if key is not None and self._by_hash.get(key.hash) == block:
            del self._by_hash[key.hash]


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
