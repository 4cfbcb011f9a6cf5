"""Hostile adapter files refused by the reader before they cost time or memory (issue 13 §2-§4)."""

from __future__ import annotations

import json
import os
import re
import resource
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.adapters import weights as weights_module
from loraserve.adapters.peft_config import MATCH_BUDGET_CAP_SECONDS, MAX_PATTERN_CHARS, parse_adapter_config
from loraserve.adapters.store import AdapterStore
from loraserve.adapters.weights import MAX_ABS_WEIGHT, ReadLimits, default_max_adapter_bytes, read_adapter
from loraserve.errors import FailedPrecondition, NotFound

WEIGHTS = "adapter_model.safetensors"
# A pattern that backtracks exponentially on a module name with no digit at the end.
BACKTRACKING = r"(?:.|.){0,40}\d"
# Bound on the CPU time a refusal costs the reading thread: the matching budget is 0.5 s to 1 s of
# wall-clock time (so at most that of CPU), and the attacks took 4.7 s (regex) and 60 s (header)
# before the fix. CPU time of this thread, not wall-clock time: a loaded machine does not add to it.
REFUSED_WITHIN_CPU_SECONDS = 5.0


@pytest.fixture(scope="module")
def shapes(toy) -> dict[str, tuple[int, int]]:
    from loraserve.adapters.layer import find_lora_targets
    from loraserve.model_loader import load_base_model

    loaded = load_base_model(str(toy.base), "none", "cpu", "float32")
    return {n: (m.in_features, m.out_features) for n, m in find_lora_targets(loaded.model).items()}


def _read(store: Path, adapter_id: str, shapes, **limits):
    with AdapterStore(store).open(adapter_id) as opened:
        return read_adapter(opened, ReadLimits(shapes, limits.pop("max_rank", 16), **limits))


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _raw_safetensors(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def test_negative_alpha_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match="lora_alpha must not be negative"):
        parse_adapter_config({"r": 4, "lora_alpha": -16})


def test_infinity_in_a_shape_is_a_clean_refusal(store_copy, shapes) -> None:
    header = b'{"x.lora_A.weight":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}'
    (store_copy.adapter("a1") / WEIGHTS).write_bytes(_raw_safetensors(header, b"\0" * 4))
    with pytest.raises(FailedPrecondition, match="not a valid safetensors file"):
        _read(store_copy.store, "a1", shapes)


def test_oversized_sparse_file_is_refused_before_reading(store_copy, shapes) -> None:
    path = store_copy.adapter("a1") / WEIGHTS
    with open(path, "r+b") as handle:
        handle.truncate(1 << 30)  # 1 GiB, sparse: nothing on disk, all of it if read
    before = _rss_bytes()
    with pytest.raises(
        FailedPrecondition, match=r"above the server's limit of \d+ bytes.*--max-adapter-bytes"
    ):
        _read(store_copy.store, "a1", shapes)
    with pytest.raises(FailedPrecondition, match="above the server's limit of 100000 bytes"):
        _read(store_copy.store, "a1", shapes, max_adapter_bytes=100_000)
    assert _rss_bytes() - before < 64 << 20


def test_default_limit_admits_every_valid_adapter(store_copy, shapes) -> None:
    limit = default_max_adapter_bytes(shapes, 16)
    assert all((store_copy.adapter(a) / WEIGHTS).stat().st_size < limit for a in ("a1", "a3", "a5"))
    assert _read(store_copy.store, "a5", shapes).max_rank == 16


def test_file_larger_than_its_config_implies(store_copy, shapes) -> None:
    folder = store_copy.adapter("a1")
    _edit_config(folder, r=1)  # rank 1: the rank-8 file is far larger than a rank-1 adapter
    with open(folder / WEIGHTS, "ab") as handle:
        handle.write(b"\0" * 300_000)
    with pytest.raises(FailedPrecondition, match=r"more than adapter_config\.json allows"):
        _read(store_copy.store, "a1", shapes)


def test_header_with_a_million_tensors_is_refused_before_parsing(store_copy, shapes, monkeypatch) -> None:
    count = 1_200_000
    entry = '"base_model.model.t{i}.lora_A.weight":{{"dtype":"F32","shape":[1],"data_offsets":[{a},{b}]}}'
    header = "{" + ",".join(entry.format(i=i, a=4 * i, b=4 * i + 4) for i in range(count)) + "}"
    (store_copy.adapter("a1") / WEIGHTS).write_bytes(_raw_safetensors(header.encode(), b"\0" * (4 * count)))
    real_read_tensors, read = weights_module._read_tensors, []
    monkeypatch.setattr(
        weights_module, "_read_tensors", lambda *args: read.append(1) or real_read_tensors(*args)
    )
    started = time.thread_time()
    with pytest.raises(FailedPrecondition, match="refused before reading"):
        _read(store_copy.store, "a1", shapes)
    assert not read  # not a byte of its header was read, let alone parsed
    assert time.thread_time() - started < REFUSED_WITHIN_CPU_SECONDS


def test_header_length_is_bounded_before_reading_it(store_copy, shapes) -> None:
    # A header length far past what this base's adapters need, in a file within the size limits.
    path = store_copy.adapter("a1") / WEIGHTS
    path.write_bytes(struct.pack("<Q", 50_000_000) + b"{" * 1000)
    with pytest.raises(FailedPrecondition, match=r"header of 50000000 bytes is above the limit of \d+ bytes"):
        _read(store_copy.store, "a1", shapes)


def test_tensor_count_is_bounded_before_parsing(store_copy, shapes) -> None:
    limits = ReadLimits(shapes, 16)
    small = ",".join(
        f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(limits.max_tensors + 1)
    )
    (store_copy.adapter("a1") / WEIGHTS).write_bytes(_raw_safetensors(("{" + small + "}").encode()))
    with pytest.raises(FailedPrecondition, match=rf"lists {limits.max_tensors + 1} tensors"):
        _read(store_copy.store, "a1", shapes)


@pytest.mark.parametrize(
    "changes",
    [
        {"target_modules": BACKTRACKING},
        {"exclude_modules": BACKTRACKING},
        {"rank_pattern": {BACKTRACKING: 4}},
        {"alpha_pattern": {BACKTRACKING: 4.0}},
        {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": BACKTRACKING},
    ],
    ids=["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "layers_pattern"],
)
def test_backtracking_patterns_are_refused_within_the_budget(store_copy, shapes, changes) -> None:
    _edit_config(store_copy.adapter("a1"), **changes)
    started = time.thread_time()
    with pytest.raises(FailedPrecondition, match="too expensive") as caught:
        _read(store_copy.store, "a1", shapes)
    # Stopped by the budget (which the message names), and matching spent no more than that.
    budget = float(re.search(r"took over ([0-9.e+-]+) s", caught.value.message).group(1))
    assert budget <= MATCH_BUDGET_CAP_SECONDS
    assert time.thread_time() - started < REFUSED_WITHIN_CPU_SECONDS


def test_a_large_legitimate_rank_pattern_is_not_refused() -> None:
    """One rank_pattern key per module of a 32-layer model (224 × 224 matches): within budget."""
    from loraserve.adapters.peft_config import resolve_modules

    leaves = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    leaves += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    names = [f"model.layers.{i}.{leaf}" for i in range(32) for leaf in leaves]
    config = parse_adapter_config(
        {
            "r": 8,
            "target_modules": "all-linear",
            "rank_pattern": {rf"layers\.{i}\.{leaf}": 4 + i % 4 for i in range(32) for leaf in leaves},
        }
    )
    plan = resolve_modules(config, names)
    assert len(plan) == len(names)
    assert plan["model.layers.5.mlp.up_proj"].rank == 5


def test_overlong_pattern_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match=f"above the {MAX_PATTERN_CHARS}-character limit"):
        parse_adapter_config({"r": 4, "target_modules": "q_proj|" * 200 + "v_proj"})


def test_module_plan_is_cached_per_config(store_copy, shapes) -> None:
    from loraserve.adapters.peft_config import resolve_modules

    config = parse_adapter_config({"r": 4, "target_modules": r".*\.(q|v)_proj"})
    first = resolve_modules(config, shapes)
    assert (
        resolve_modules(parse_adapter_config({"r": 4, "target_modules": r".*\.(q|v)_proj"}), shapes) is first
    )
    assert sorted(name.rsplit(".", 1)[-1] for name in first) == ["q_proj", "q_proj", "v_proj", "v_proj"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_that_would_overflow_are_refused_by_magnitude(store_copy, shapes, dtype) -> None:
    folder = store_copy.adapter("a1")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors = {k: v.to(dtype) for k, v in load_file(str(folder / WEIGHTS)).items()}
    save_file(tensors, str(folder / WEIGHTS))
    weights = _read(store_copy.store, "a1", shapes)  # the same adapter in this dtype reads fine
    assert weights.modules["model.layers.1.mlp.up_proj"].b.dtype == dtype
    big = 6e4 if dtype == torch.float16 else 1e18
    tensors[key] = tensors[key].clone()
    tensors[key][3, 1] = -big
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(
        FailedPrecondition, match=rf"tensor {key}: weights reach.*bound of {MAX_ABS_WEIGHT:g} \(max \|w\|\)"
    ):
        _read(store_copy.store, "a1", shapes)


def test_huge_scale_counts_against_the_bound(store_copy, shapes) -> None:
    _edit_config(store_copy.adapter("a1"), lora_alpha=1e12)
    with pytest.raises(FailedPrecondition, match="after the LoRA scale"):
        _read(store_copy.store, "a1", shapes)


def test_unsupported_dtype_is_named(store_copy, shapes) -> None:
    folder = store_copy.adapter("a1")
    tensors = {k: v.to(torch.int8) for k, v in load_file(str(folder / WEIGHTS)).items()}
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(FailedPrecondition, match="dtype I8 is not supported"):
        _read(store_copy.store, "a1", shapes)


# --------------------------------------------------------------------------- the store's opening
def test_a_folder_swapped_for_a_link_after_listing_is_not_followed(store_copy, tmp_path) -> None:
    store = AdapterStore(store_copy.store)
    assert store.exists("a1")
    outside = tmp_path / "outside"
    (store_copy.store / "a1").rename(outside)
    os.symlink(outside, store_copy.store / "a1")  # the swap, after the check a caller may have made
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        store.open("a1")
    os.symlink(outside, store_copy.store / "org" / "inner")
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        store.open("org/inner")


def test_fifo_weights_do_not_hang_the_reader(store_copy) -> None:
    folder = store_copy.adapter("a1")
    (folder / WEIGHTS).unlink()
    os.mkfifo(folder / WEIGHTS)
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        AdapterStore(store_copy.store).open("a1")


def test_fingerprint_changes_with_the_files(store_copy) -> None:
    store = AdapterStore(store_copy.store)
    with store.open("a1") as opened:
        first = opened.fingerprint
    with store.open("a1") as opened:
        assert opened.fingerprint == first
    (store_copy.adapter("a1") / WEIGHTS).write_bytes((store_copy.adapter("a6") / WEIGHTS).read_bytes())
    with store.open("a1") as opened:
        assert opened.fingerprint != first
    with pytest.raises(NotFound):
        store.open("missing")
