"""The multi-adapter LoRA layer against PEFT's per-adapter layers and the naive per-token loop."""

from __future__ import annotations

import random

import pytest
import torch

from loraserve.adapters.layer import SlotTable
from loraserve.adapters.ops import lora_reference
from loraserve.adapters.store import AdapterStore
from loraserve.adapters.weights import read_adapter_weights
from loraserve.model_loader import load_base_model
from tests.helpers import TOY_ADAPTERS, PeftReference

IDS = list(TOY_ADAPTERS)


@pytest.fixture(scope="module", params=["none", "nf4"])
def setup(request, toy):
    quantization = request.param
    loaded = load_base_model(str(toy.base), quantization, "cpu", "float32")
    table = SlotTable.attach(
        loaded.model, num_slots=len(IDS), max_rank=16, dtype=torch.float32, device=torch.device("cpu")
    )
    store = AdapterStore(toy.store)
    for slot, adapter_id in enumerate(IDS):
        files = store.files(adapter_id)
        table.set_slot(slot, read_adapter_weights(files.config, files.weights, table.shapes, 16))
    reference = PeftReference(toy, quantization)
    return loaded.model, table, reference


def _peft_layer(reference: PeftReference, name: str):
    return reference.model.base_model.model.get_submodule(name)


@torch.inference_mode()
def test_each_module_matches_peft_and_naive_loop(setup) -> None:
    _, table, reference = setup
    rng = random.Random(0)
    for name, layer in table.layers.items():
        n_in = table.shapes[name][0]
        slots = [rng.choice(range(-1, len(IDS))) for _ in range(40)]
        slots.sort()  # the runner orders tokens by slot
        x = torch.randn(len(slots), n_in, generator=torch.Generator().manual_seed(hash(name) % 1000))
        table.set_batch(slots)
        ours = layer(x[None])[0]
        table.clear_batch()
        base = layer.base(x)
        naive = base + lora_reference(x, slots, layer.lora_a, layer.lora_b)
        torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5)
        peft_layer = _peft_layer(reference, name)
        for slot in sorted(set(slots)):
            rows = [i for i, s in enumerate(slots) if s == slot]
            if slot < 0:
                with reference.model.disable_adapter():
                    expected = peft_layer(x[rows])
            else:
                reference.model.set_adapter(IDS[slot])
                expected = peft_layer(x[rows])
            torch.testing.assert_close(ours[rows], expected, rtol=1e-4, atol=1e-5, msg=f"{name} slot {slot}")


@torch.inference_mode()
def test_whole_model_logits_match_peft_per_adapter(setup) -> None:
    model, table, reference = setup
    prompt = reference.tokenizer("the quick brown fox jumps")["input_ids"]
    ids = torch.tensor([prompt])
    for slot, adapter_id in [(-1, ""), *enumerate(IDS)]:
        table.set_batch([slot] * len(prompt))
        ours = model(input_ids=ids).logits[0].float()
        table.clear_batch()
        torch.testing.assert_close(ours, reference.logits(prompt, adapter_id), rtol=1e-4, atol=1e-4)
