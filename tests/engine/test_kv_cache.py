"""Block bookkeeping of the paged KV cache."""

from __future__ import annotations

import pytest

from loraserve.engine.fairness import VirtualTokenCounter
from loraserve.engine.kv_cache import BlockManager


def test_grow_and_release() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    blocks.grow(table, 5)
    assert len(set(table)) == 2 and blocks.num_free == 2 and blocks.usage == 0.5
    blocks.grow(table, 8)  # still fits in two blocks
    assert len(table) == 2 and blocks.extra_blocks(table, 9) == 1
    assert blocks.can_grow(table, 16) and not blocks.can_grow(table, 17)
    with pytest.raises(RuntimeError, match="out of blocks"):
        blocks.grow(table, 17)
    blocks.release(table)
    assert table == [] and blocks.num_free == 4


def test_virtual_token_counter_orders_and_lifts() -> None:
    vtc = VirtualTokenCounter({"gold": 2.0})
    vtc.charge("a", prompt_tokens=10, output_tokens=5)  # 20
    vtc.charge("gold", output_tokens=10)  # 20 / 2 = 10
    assert vtc.order(["a", "gold"]) == ["gold", "a"]
    vtc.activate("idle", backlogged=["a", "gold"])  # comes back: lifted to the least-served backlog
    assert vtc.counters["idle"] == 10
