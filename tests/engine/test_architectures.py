"""The runner on other Llama-family architectures: Mistral (sliding window) and Qwen2 (qkv biases)."""

from __future__ import annotations

import pytest
import torch

from loraserve.engine.engine import Engine, EngineConfig
from loraserve.model_loader import load_base_model
from loraserve.toy import build_tokenizer
from tests.engine.conftest import Driver

PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello world", "o rato roeu a roupa do rei de roma"]


def _save(kind: str, path) -> None:
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "initializer_range": 0.1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=8, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_greedy_outputs_match_transformers(kind: str, tmp_path) -> None:
    _save(kind, tmp_path / kind)
    reference = load_base_model(str(tmp_path / kind), "nf4", "cpu", "float32")
    loaded = load_base_model(str(tmp_path / kind), "nf4", "cpu", "float32")
    engine = Engine(loaded, EngineConfig(kv_cache_bytes=1 << 20, block_size=4))
    driver = Driver(engine)
    outcomes = [driver.submit(p, "", 20, ignore_eos=True)[1] for p in PROMPTS]
    driver.run(outcomes)  # batched together, prompts and outputs longer than the sliding window
    for prompt, outcome in zip(PROMPTS, outcomes):
        ids = reference.tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            out = reference.model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=20,
                min_new_tokens=20,
                do_sample=False,
                pad_token_id=0,
            )
        assert outcome.token_ids == out[0, len(ids) :].tolist(), (kind, prompt)
    engine.shutdown()
