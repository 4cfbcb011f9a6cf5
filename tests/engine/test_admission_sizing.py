"""Admission limits against a plain count, and KV cache sizing against the plain formula."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from loraserve.engine.admission import Admission
from loraserve.engine.kv_sizing import KVGeometry, kv_cache_blocks
from loraserve.errors import ResourceExhausted


def test_admission_refuses_at_each_limit_naming_it() -> None:
    admission = Admission(max_queue_size=3, max_queue_per_tenant=2)
    admission.enter("a", running=0)
    admission.enter("a", running=0)
    with pytest.raises(ResourceExhausted, match=r"tenant 'a' has 2 requests in flight \(its limit\)"):
        admission.enter("a", running=0)
    admission.enter("b", running=0)
    with pytest.raises(ResourceExhausted, match=r"server queue is full \(3 requests waiting\)"):
        admission.enter("c", running=0)
    admission.enter("c", running=1)  # one of the three is in the batch: two wait
    assert admission.in_flight == 4 and admission.of("a") == 2 and admission.of("c") == 1
    for tenant in ("a", "a", "b", "c"):
        admission.leave(tenant)
    assert admission.in_flight == 0 and admission.of("a") == 0


def test_admission_matches_a_plain_count() -> None:
    rng = random.Random(0)
    admission = Admission(max_queue_size=6, max_queue_per_tenant=3)
    counts: dict[str, int] = {}
    for _ in range(2000):
        tenant = rng.choice("xyz")
        running = rng.randint(0, sum(counts.values()))
        if counts.get(tenant) and rng.random() < 0.5:
            admission.leave(tenant)
            counts[tenant] -= 1
            continue
        fits = sum(counts.values()) - running < 6 and counts.get(tenant, 0) < 3
        try:
            admission.enter(tenant, running)
            admitted = True
        except ResourceExhausted:
            admitted = False
        assert admitted == fits
        if admitted:
            counts[tenant] = counts.get(tenant, 0) + 1
        assert admission.in_flight == sum(counts.values())
        assert all(admission.of(t) == n for t, n in counts.items())


def test_kv_geometry_and_block_count_follow_the_plain_formula() -> None:
    explicit = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, head_dim=32
    )
    geometry = KVGeometry.of(explicit)
    assert geometry == KVGeometry(num_layers=3, num_kv_heads=2, head_dim=32)
    per_block = 2 * 3 * 16 * 2 * 32 * 2  # K and V, layers, tokens, KV heads, head_dim, bf16 bytes
    assert geometry.bytes_per_block(16, torch.bfloat16) == per_block
    # Without num_key_value_heads or head_dim (older configs): MHA, hidden_size / heads.
    plain = SimpleNamespace(hidden_size=96, num_attention_heads=6, num_hidden_layers=2)
    assert KVGeometry.of(plain) == KVGeometry(num_layers=2, num_kv_heads=6, head_dim=16)
    # The budget decides, unless max_num_seqs full-context sequences need fewer blocks.
    assert kv_cache_blocks(geometry, torch.bfloat16, 16, 10 * per_block + 5, 64, 256) == 10
    assert kv_cache_blocks(geometry, torch.bfloat16, 16, 10**12, 2, 100) == 2 * 7
    assert kv_cache_blocks(geometry, torch.bfloat16, 16, 1, 64, 256) == 1
