"""The multi-adapter LoRA layer against PEFT's per-adapter layers and the naive per-token loop.

The whole-model comparisons run the NF4 base in its configured compute dtype (float32). On a CPU
with AVX512-BF16, bitsandbytes (0.50) runs `Linear4bit` in eval mode through a fused kernel that
casts the input to bfloat16 whatever `bnb_4bit_compute_dtype` says: its output is then ~1e-2
from the float32 product of the dequantized weights, and a 1-ulp float32 difference in its input
(our LoRA term folds the scale into B, PEFT multiplies by it after B: they round differently
when the scale is not a power of two, as rsLoRA's alpha/sqrt(r)) can flip a bfloat16 rounding
that the following layers amplify to ~2e-2 in the logits. With the base in float32, ours, PEFT
and a naive reference (dequantized weights + explicit LoRA math) agree to ~2e-6.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from loraserve.adapters.layer import SlotTable
from loraserve.adapters.lora_backends import lora_reference
from loraserve.adapters.store import CONFIG_FILE, WEIGHTS_FILE
from loraserve.adapters.weights import read_adapter_weights
from loraserve.forward_context import ForwardContext, current_forward_context, forward_context
from loraserve.model_loader import load_base_model
from tests.helpers import TOY_ADAPTERS, PeftReference

IDS = list(TOY_ADAPTERS)


def base_in_compute_dtype(model: nn.Module) -> None:
    """Makes bitsandbytes' 4-bit layers compute in their compute dtype (see the module docstring)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # Must happen before the first forward, which repacks the weight for the fused kernel.
            assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
            module.support_avx512bf16_for_cpu = False


def naive_reference(toy, quantization: str, reference: PeftReference) -> nn.Module:
    """The base in float32 with the dequantized weights of `reference`'s layers, plus explicit LoRA
    math (x @ Aᵀ @ Bᵀ · scaling) from PEFT's parsed tensors for the adapter `model.active` names."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    model = load_base_model(str(toy.base), "none", "cpu", "float32").model
    model.active = ""
    peft_modules = dict(reference.model.base_model.model.named_modules())
    for name, linear in list(model.named_modules()):
        peft_layer = peft_modules.get(name)
        if not isinstance(linear, nn.Linear) or not hasattr(peft_layer, "lora_A"):
            continue
        base = peft_layer.base_layer
        if isinstance(base, bnb.nn.Linear4bit):
            linear.weight.data.copy_(bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state))

        def add_lora(module, inputs, out, peft_layer=peft_layer):
            adapter = model.active
            if adapter not in peft_layer.lora_A:
                return out
            a, b = peft_layer.lora_A[adapter].weight, peft_layer.lora_B[adapter].weight  # [r, in], [out, r]
            return out + (inputs[0] @ a.T @ b.T) * peft_layer.scaling[adapter]

        linear.register_forward_hook(add_lora)
    return model


@pytest.fixture(scope="module", params=["none", "nf4"])
def setup(request, toy):
    quantization = request.param
    loaded = load_base_model(str(toy.base), quantization, "cpu", "float32")
    base_in_compute_dtype(loaded.model)
    table = SlotTable.attach(
        loaded.model, num_slots=len(IDS), max_rank=16, dtype=torch.float32, device=torch.device("cpu")
    )
    for slot, adapter_id in enumerate(IDS):
        folder = toy.adapter(adapter_id)
        weights = read_adapter_weights(folder / CONFIG_FILE, folder / WEIGHTS_FILE, table.shapes, 16)
        table.set_slot(slot, weights)
    reference = PeftReference(toy, quantization)
    base_in_compute_dtype(reference.model)
    return loaded.model, table, reference, naive_reference(toy, quantization, reference)


def _peft_layer(reference: PeftReference, name: str):
    return reference.model.base_model.model.get_submodule(name)


@torch.inference_mode()
def test_each_module_matches_peft_and_naive_loop(setup) -> None:
    _, table, reference, _ = setup
    rng = random.Random(0)
    for name, layer in table.layers.items():
        n_in = table.shapes[name][0]
        slots = [rng.choice(range(-1, len(IDS))) for _ in range(40)]
        slots.sort()  # the runner orders tokens by slot
        x = torch.randn(len(slots), n_in, generator=torch.Generator().manual_seed(hash(name) % 1000))
        with forward_context(ForwardContext(lora=table.plan(slots))):
            ours = layer(x[None])[0]
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
    model, table, reference, naive = setup
    prompt = reference.tokenizer("the quick brown fox jumps")["input_ids"]
    ids = torch.tensor([prompt])
    for slot, adapter_id in [(-1, ""), *enumerate(IDS)]:
        with forward_context(ForwardContext(lora=table.plan([slot] * len(prompt)))):
            ours = model(input_ids=ids).logits[0].float()
        naive.active = adapter_id
        expected = naive(input_ids=ids).logits[0].float()
        msg = f"adapter {adapter_id or 'base'}"
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4, msg=msg)
        torch.testing.assert_close(ours, reference.logits(prompt, adapter_id), rtol=1e-4, atol=1e-4, msg=msg)


@torch.inference_mode()
def test_layers_add_nothing_outside_a_step(setup) -> None:
    _, table, _, _ = setup
    name, layer = next(iter(table.layers.items()))
    x = torch.randn(3, table.shapes[name][0])
    assert current_forward_context() is None
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    with forward_context(ForwardContext(lora=table.plan([-1, -1, -1]))) as context:
        assert context.lora is None  # a base-only step has no plan: layers skip the LoRA term
        torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
