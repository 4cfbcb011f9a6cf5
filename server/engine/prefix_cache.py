"""Prefix caching: full KV blocks reused across requests and chat turns, keyed by adapter and load.

A LoRA adapter on k_proj/v_proj changes K and V, so a block computed under one adapter is wrong
under another, and under the same adapter's previous weights. Each full block is therefore
keyed by a hash chained on its parent's (nano-vllm's scheme), with the chain seeded by what
the KV depends on besides the tokens:

    seed    = H(version, tenant, "base", model, layout)                           base model
    seed    = H(version, tenant, "adapter", id, fingerprint, load generation, layout)  an adapter
    hash[0] = H(seed, tokens of block 0);  hash[i] = H(hash[i-1], tokens of block i)

`fingerprint` identifies the adapter's files as read (device, inode, size, mtime, ctime of the
config and the weights) and `load generation` is bumped by the adapter registry on every unload
and reload, so a block computed under one version of an adapter is unreachable from any other,
even when the files did not change. `layout` counts changes of the base weights' numerics (a
training job unpacks bitsandbytes' CPU weights, and packs them back when it ends: see
loraserve.training.run), so KV computed under one layout is never reused under the other. The
tenant (the authenticated one; empty without API keys) keeps tenants from reading each other's
prefixes through timing. H is BLAKE2b-128, and a hit also compares the block's tokens, so a
collision can never serve another prefix's KV.

Life cycle (the blocks themselves: loraserve.engine.kv_cache.BlockManager): a new sequence
takes the cached blocks of its longest cached prefix (references counted) and its prefill
starts after them, always leaving at least its last token to compute so that there are
logits to sample from; each block it fills is published under its hash once computed; when it
ends or is preempted its references go, and full blocks wait in the evictable cache, oldest
first. Unloading or reloading an adapter drops its cached blocks at the next step.
"""

from __future__ import annotations

import hashlib
import queue
from array import array
from typing import Any

from loraserve.engine.kv_cache import BlockKey, BlockManager
from loraserve.engine.sequence import Sequence

VERSION = "loraserve-prefix-cache/1"
HASH_BYTES = 16


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


def base_seed(model: str, tenant: str, layout: int = 0) -> bytes:
    """The chain's seed for the base model (no adapter)."""
    return _digest(repr((VERSION, tenant, "base", model, layout)).encode())


def adapter_seed(adapter: Any, tenant: str, layout: int = 0) -> bytes | None:
    """The chain's seed for one version of an adapter (an AdapterEntry); None before it is read."""
    fingerprint = adapter.fingerprint
    if fingerprint is None:
        return None
    version = (fingerprint.config, fingerprint.weights, adapter.load_generation)
    return _digest(repr((VERSION, tenant, "adapter", adapter.adapter_id, version, layout)).encode())


def chain(parent: bytes, tokens: list[int] | tuple[int, ...]) -> bytes:
    """The hash of a block of tokens following the block (or seed) hashed as `parent`."""
    h = hashlib.blake2b(parent, digest_size=HASH_BYTES)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class PrefixCache:
    """Matches, shares and publishes sequences' full KV blocks (engine thread), with its metrics."""

    def __init__(self, blocks: BlockManager, model: str, enabled: bool = True, metrics: Any = None) -> None:
        self.blocks = blocks
        self.model = model
        self.enabled = enabled
        self.metrics = metrics
        self._retired: queue.SimpleQueue[str] = queue.SimpleQueue()  # filled from any thread
        self._reported_evictions = 0
        self.layout = 0  # bumped when the base weights' numerics change (see the module docstring)

    def new_layout(self) -> None:
        """The base weights now compute differently: no block computed before is reused (the old
        ones age out of the evictable cache). Engine thread."""
        self.layout += 1

    # ------------------------------------------------------------------ admission
    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks of seq's longest cached prefix, leaving its last token to compute.

        Read-only: `attach` takes them. Empty when the cache is off or the sequence's adapter is
        being unloaded (its blocks are on their way out).
        """
        if not self._cacheable(seq):
            return []
        bs = self.blocks.block_size
        tokens = seq.prompt_ids + seq.output_ids
        hits: list[int] = []
        for i in range((len(tokens) - 1) // bs):
            block = self.blocks.lookup(self._hash(seq, tokens, i), tuple(tokens[i * bs : (i + 1) * bs]))
            if block is None:
                break
            hits.append(block)
        return hits

    def attach(self, seq: Sequence, hits: list[int]) -> None:
        """Gives a sequence being admitted (no blocks yet) the blocks `match` found: its prefill
        starts after them."""
        self.blocks.take(seq.block_table, hits)
        seq.num_computed = len(hits) * self.blocks.block_size
        seq.cached_blocks = len(hits)
        if seq.preemptions == 0:
            seq.cached_prompt_tokens = seq.num_computed
        if self.enabled and self.metrics is not None:
            self.metrics.prefix_cache_queries.inc(seq.num_tokens)
            self.metrics.prefix_cache_hits.inc(seq.num_computed)

    # ------------------------------------------------------------------ after a step
    def commit(self, seq: Sequence) -> None:
        """Publishes the blocks that seq's last step filled (their K/V are now all computed)."""
        bs = self.blocks.block_size
        full = min(seq.num_computed // bs, len(seq.block_table))
        if full <= seq.cached_blocks or not self._cacheable(seq):
            return
        tokens = seq.prompt_ids + seq.output_ids
        owner = seq.request.adapter_id
        for i in range(seq.cached_blocks, full):
            key = BlockKey(self._hash(seq, tokens, i), tuple(tokens[i * bs : (i + 1) * bs]), owner)
            self.blocks.publish(seq.block_table[i], key)
        seq.cached_blocks = full

    # ------------------------------------------------------------------ adapters
    def retire(self, adapter_id: str) -> None:
        """An adapter was unloaded or reloaded (any thread): its blocks go at the next step."""
        self._retired.put(adapter_id)

    def apply_retirements(self) -> None:
        """Drops the cached blocks of retired adapter versions (engine thread, before scheduling)."""
        owners = []
        while True:
            try:
                owners.append(self._retired.get_nowait())
            except queue.Empty:
                break
        if owners:
            self.blocks.forget(owners)

    def report(self) -> None:
        if self.metrics is None:
            return
        self.metrics.prefix_cache_blocks.set(self.blocks.num_cached)
        evicted = self.blocks.evictions - self._reported_evictions
        if evicted:
            self.metrics.prefix_cache_evictions.inc(evicted)
            self._reported_evictions = self.blocks.evictions

    # ------------------------------------------------------------------ internals
    def _cacheable(self, seq: Sequence) -> bool:
        if not self.enabled:
            return False
        if seq.cache_seed is None:
            if seq.adapter is None:
                seq.cache_seed = base_seed(self.model, seq.request.tenant, self.layout)
            else:
                seq.cache_seed = adapter_seed(seq.adapter, seq.request.tenant, self.layout)
        # A draining adapter version publishes nothing more: its blocks are being dropped.
        return seq.cache_seed is not None and not (seq.adapter is not None and seq.adapter.draining)

    def _hash(self, seq: Sequence, tokens: list[int], index: int) -> bytes:
        """The chained hash of seq's full block `index` (memoized on the sequence: tokens only grow)."""
        bs = self.blocks.block_size
        hashes = seq.block_hashes
        while len(hashes) <= index:
            i = len(hashes)
            hashes.append(chain(hashes[-1] if hashes else seq.cache_seed, tokens[i * bs : (i + 1) * bs]))
        return hashes[index]
