"""The engine on each LoRA backend: `--lora-backend` reaches the slot table, and a batch mixing
adapters and the base model decodes to PEFT's greedy tokens on every backend."""

from __future__ import annotations

import pytest

from loraserve.config import ConfigError, load_config
from loraserve.engine.engine import EngineConfig
from tests.helpers import PROMPTS, TOY_ADAPTERS

ADAPTERS = ["", *TOY_ADAPTERS]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_mixed_batch_matches_peft_on_each_backend(make_driver, peft_ref, backend: str) -> None:
    driver = make_driver(max_loaded_adapters=len(TOY_ADAPTERS), lora_backend=backend)
    assert driver.engine.slots.backend.name == backend
    jobs = [(PROMPTS[i % len(PROMPTS)], adapter) for i, adapter in enumerate(ADAPTERS)]
    outcomes = [driver.submit(prompt, adapter, 6, ignore_eos=True)[1] for prompt, adapter in jobs]
    driver.run(outcomes)  # all in one batch: prefill chunks, then decode steps, mixed slots
    for (prompt, adapter), outcome in zip(jobs, outcomes):
        ids = driver.tokenizer(prompt)["input_ids"]
        assert outcome.token_ids == peft_ref.generate(ids, adapter, 6, ignore_eos=True), (prompt, adapter)


def test_the_flag_reaches_the_engine(monkeypatch) -> None:
    assert EngineConfig.from_server_config(load_config()).lora_backend == "auto"
    monkeypatch.setenv("LORASERVE_LORA_BACKEND", "torch")
    assert EngineConfig.from_server_config(load_config()).lora_backend == "torch"
    with pytest.raises(ConfigError, match=r"^--lora-backend: the triton LoRA backend cannot run here"):
        load_config(lora_backend="triton")
