"""Adapter ids, paths, formats and validation: every bad case gets its clear error."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.adapters.peft_config import parse_adapter_config
from loraserve.adapters.store import AdapterStore
from loraserve.adapters.weights import read_adapter_weights
from loraserve.errors import FailedPrecondition, InvalidArgument, NotFound
from loraserve.ids import validate_adapter_id

SHAPES_ARGS = {"max_rank": 16}


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../x",
        "/etc",
        "a/../../b",
        "a/b/c",
        "..",
        ".",
        ".hidden",
        "a b",
        "a\x00b",
        "x" * 200,
        "a//b",
        "-x",
        "a/",
        "~root",
        "a\\b",
    ],
)
def test_malformed_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_adapter_id(bad)


@pytest.mark.parametrize("good", ["a1", "org/a2", "A.b-c_d", "x" * 128])
def test_wellformed_ids(good: str) -> None:
    assert validate_adapter_id(good) == good


def test_symlink_out_of_the_store_is_refused(store_copy, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(store_copy.adapter("a1"), outside)
    os.symlink(outside, store_copy.store / "escape")
    with pytest.raises(FailedPrecondition, match="outside the adapter store"):
        AdapterStore(store_copy.store).files("escape")
    assert "escape" not in AdapterStore(store_copy.store).list_ids()


def test_symlinked_file_out_of_the_store_is_refused(store_copy, tmp_path: Path) -> None:
    folder = store_copy.adapter("a1")
    target = tmp_path / "weights.safetensors"
    shutil.move(folder / "adapter_model.safetensors", target)
    os.symlink(target, folder / "adapter_model.safetensors")
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        AdapterStore(store_copy.store).files("a1")


def test_unknown_and_missing(store_copy) -> None:
    store = AdapterStore(store_copy.store)
    with pytest.raises(NotFound):
        store.files("nope")
    (store_copy.store / "empty").mkdir()
    with pytest.raises(FailedPrecondition, match=r"no adapter_config\.json"):
        store.files("empty")


def test_pickle_only_is_refused(store_copy) -> None:
    folder = store_copy.adapter("a1")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(FailedPrecondition, match="safetensors is required"):
        AdapterStore(store_copy.store).files("a1")


def test_list_ids(toy) -> None:
    assert AdapterStore(toy.store).list_ids() == sorted(["a1", "org/a2", "a3", "a4", "a5", "a6"])


# --------------------------------------------------------------------------- weights and config
def _shapes(toy) -> dict[str, tuple[int, int]]:
    from loraserve.adapters.layer import find_lora_targets
    from loraserve.model_loader import load_base_model

    loaded = load_base_model(str(toy.base), "none", "cpu", "float32")
    return {n: (m.in_features, m.out_features) for n, m in find_lora_targets(loaded.model).items()}


@pytest.fixture(scope="module")
def shapes(toy):
    return _shapes(toy)


def _read(folder: Path, shapes, **kwargs):
    args = {**SHAPES_ARGS, **kwargs}
    return read_adapter_weights(
        folder / "adapter_config.json", folder / "adapter_model.safetensors", shapes, **args
    )


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_good_adapter_scales(store_copy, shapes) -> None:
    weights = _read(store_copy.adapter("org/a2"), shapes)
    module = weights.modules["model.layers.0.self_attn.q_proj"]
    assert module.rank == 4 and module.scale == pytest.approx(8 / 4**0.5)  # rsLoRA
    weights = _read(store_copy.adapter("a3"), shapes)
    assert weights.modules["model.layers.0.self_attn.o_proj"].rank == 2  # rank_pattern
    assert weights.modules["model.layers.1.self_attn.q_proj"].scale == pytest.approx(3.0 / 6)  # alpha_pattern
    assert weights.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(12 / 6)
    weights = _read(store_copy.adapter("a4"), shapes)
    assert all(".layers.1." in name for name in weights.modules)  # layers_to_transform


BAD_CONFIGS = {
    "dora": ({"use_dora": True}, "DoRA"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    "bias": ({"bias": "all"}, "bias"),
    "peft_type": ({"peft_type": "IA3"}, "peft_type"),
    "rank": ({"r": 0}, "r must be a positive integer"),
    "alpha": ({"lora_alpha": "big"}, "lora_alpha"),
    "pissa": ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    "rank_pattern": ({"rank_pattern": {"q_proj": -1}}, "rank_pattern"),
    "regex": ({"target_modules": "(unclosed"}, "target_modules"),
    "layer_replication": ({"layer_replication": [[0, 1]]}, "layer_replication"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_name_the_field(case: str, store_copy, shapes) -> None:
    changes, message = BAD_CONFIGS[case]
    folder = store_copy.adapter("a1")
    _edit_config(folder, **changes)
    with pytest.raises(FailedPrecondition, match=message):
        _read(folder, shapes)


def test_config_not_json(store_copy, shapes) -> None:
    folder = store_copy.adapter("a1")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(FailedPrecondition, match="not valid JSON"):
        _read(folder, shapes)


def test_corrupt_safetensors(store_copy, shapes) -> None:
    folder = store_copy.adapter("a1")
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage-header!!")
    with pytest.raises(FailedPrecondition, match="not a valid safetensors file"):
        _read(folder, shapes)


def test_rank_above_the_server_limit(store_copy, shapes) -> None:
    with pytest.raises(FailedPrecondition, match="above the server's max_lora_rank 8"):
        _read(store_copy.adapter("a5"), shapes, max_rank=8)


def test_wrong_shapes(store_copy, shapes) -> None:
    folder = store_copy.adapter("a1")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_tensors(folder, lambda t: t.__setitem__(key, torch.zeros(8, 65)))
    with pytest.raises(FailedPrecondition, match="do not fit the base layer"):
        _read(folder, shapes)


def test_rank_mismatch_between_config_and_weights(store_copy, shapes) -> None:
    folder = store_copy.adapter("a1")
    _edit_config(folder, r=4)
    with pytest.raises(FailedPrecondition, match="rank 8 in the weights but 4"):
        _read(folder, shapes)


@pytest.mark.parametrize(
    "key, message",
    [
        ("base_model.model.lm_head.lora_A.weight", "not a LoRA target this base supports"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", "embeddings"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "biases"),
        ("base_model.model.model.layers.0.self_attn.q_proj.weird", "not a LoRA A/B weight"),
    ],
)
def test_unsupported_tensors_are_named(store_copy, shapes, key: str, message: str) -> None:
    folder = store_copy.adapter("a1")
    _edit_tensors(folder, lambda t: t.__setitem__(key, torch.zeros(8, 64)))
    with pytest.raises(FailedPrecondition, match=message):
        _read(folder, shapes)


def test_tensor_outside_config_targets(store_copy, shapes) -> None:
    folder = store_copy.adapter("a1")
    _edit_config(folder, target_modules=["q_proj"])
    with pytest.raises(FailedPrecondition, match=r"not targeted by adapter_config\.json"):
        _read(folder, shapes)


def test_non_finite_weights_are_refused_when_read(store_copy, shapes) -> None:
    folder = store_copy.adapter("a1")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")

    _edit_tensors(folder, poison)
    with pytest.raises(FailedPrecondition, match=f"tensor {key}: LoRA weights contain NaN or infinity"):
        _read(folder, shapes)


def test_truncated_safetensors(store_copy, shapes) -> None:
    path = store_copy.adapter("a1") / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FailedPrecondition, match="not a valid safetensors file"):
        _read(store_copy.adapter("a1"), shapes)


def test_target_module_matching_rules() -> None:
    config = parse_adapter_config({"r": 4, "target_modules": ["q_proj"], "layers_to_transform": [1]})
    assert config.targets("model.layers.1.self_attn.q_proj")
    assert not config.targets("model.layers.0.self_attn.q_proj")
    assert not config.targets("model.layers.1.self_attn.k_proj")
    regex = parse_adapter_config({"r": 4, "target_modules": r".*\.(q|v)_proj"})
    assert regex.targets("model.layers.0.self_attn.v_proj") and not regex.targets(
        "model.layers.0.mlp.up_proj"
    )
    excluded = parse_adapter_config(
        {"r": 4, "target_modules": "all-linear", "exclude_modules": ["down_proj"]}
    )
    assert excluded.targets("model.layers.0.mlp.up_proj") and not excluded.targets(
        "model.layers.0.mlp.down_proj"
    )
