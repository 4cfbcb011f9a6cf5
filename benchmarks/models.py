"""The benchmark's model and adapters, built here from a config (seeded) and reused across runs.

The bench model: Llama architecture, vocab 32000, hidden 768, intermediate 2048,
8 layers, 12 heads, 4 KV heads (NF4 when served). Adapters are random rank-r LoRA on the chosen
modules: the first is made and saved by PEFT itself, the others copy its config and key layout
with fresh random tensors (PEFT's own saving would take seconds each for a thousand adapters).
"""

from __future__ import annotations

import json
import random
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraserve.adapters.synthetic import make_peft_adapter
from loraserve.toy import save_toy_model

# The default recipe's targets (every linear layer of a decoder layer).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SHAPES = {
    "bench": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "vocab_size": 32000,
    },
    # About 1.1B parameters, Llama-3.2-1B's shape with a 32000-token vocabulary (scripts/gpu_check.sh).
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 2048,
        "vocab_size": 32000,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
}


@dataclass(frozen=True)
class BenchAssets:
    model_dir: Path
    store: Path
    adapter_ids: list[str]


def synthetic_corpus(words: int = 300_000, seed: int = 0) -> list[str]:
    """Random lowercase words: enough distinct pairs for a byte-level BPE of 32000 tokens."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10))) for _ in range(words)
    ]
    return [" ".join(vocab[i : i + 50]) for i in range(0, words, 50)]


def build_model(work_dir: Path, size: str) -> Path:
    path = work_dir / f"model-{size}"
    if not (path / "config.json").is_file():
        staging = work_dir / f".model-{size}.building"
        shutil.rmtree(staging, ignore_errors=True)
        shape = dict(SHAPES[size])
        corpus, tokens = (synthetic_corpus(), shape["vocab_size"]) if "vocab_size" in shape else (None, 384)
        kwargs = {"corpus": corpus} if corpus is not None else {}
        save_toy_model(staging, tokenizer_vocab=tokens, seed=1234, initializer_range=0.05, **kwargs, **shape)
        staging.rename(path)
    return path


def adapter_id(index: int) -> str:
    return f"bench/a{index:04d}"


def build_adapters(
    model_dir: Path,
    store: Path,
    count: int,
    rank: int,
    targets: list[str],
    dtype: torch.dtype = torch.bfloat16,
) -> list[str]:
    """`count` adapters under store/bench/ (reusing those already there with the same recipe)."""
    recipe = {"rank": rank, "targets": sorted(targets), "dtype": str(dtype)}
    marker = store / "bench" / "recipe.json"
    if marker.is_file() and json.loads(marker.read_text()) != recipe:
        shutil.rmtree(store / "bench")
    ids = [adapter_id(i) for i in range(count)]
    first = store / ids[0]
    if not (first / "adapter_model.safetensors").is_file():
        make_peft_adapter(
            model_dir, first, seed=0, r=rank, lora_alpha=2 * rank, target_modules=targets, weight_std=0.02
        )
        tensors = load_file(str(first / "adapter_model.safetensors"))
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(first / "adapter_model.safetensors"))
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(recipe))
    template = load_file(str(first / "adapter_model.safetensors"))
    for index, name in enumerate(ids[1:], start=1):
        folder = store / name
        if (folder / "adapter_model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(index)
        tensors = {
            k: (torch.randn(v.shape, generator=generator) * 0.02).to(dtype) for k, v in template.items()
        }
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        shutil.copy(first / "adapter_config.json", folder / "adapter_config.json")
    return ids


def prepare(work_dir: Path, size: str, adapters: int, rank: int, targets: list[str]) -> BenchAssets:
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(work_dir, size)
    # One store per recipe, so a run with another rank or other targets keeps the default one.
    default = rank == 16 and sorted(targets) == sorted(ALL_LINEAR)
    store = work_dir / (
        f"adapters-{size}" if default else f"adapters-{size}-r{rank}-{'-'.join(sorted(targets))}"
    )
    ids = build_adapters(model_dir, store, max(adapters, 1), rank, targets)
    return BenchAssets(model_dir, store, ids[:adapters])
