"""A training job's LoRA through the served layers equals PEFT: same loss, same gradients."""

from __future__ import annotations

import json

import pytest
import torch

from loraserve.adapters.layer import SlotTable
from loraserve.adapters.trainable import select_modules
from loraserve.engine.attention import register
from loraserve.errors import InvalidArgument
from loraserve.model_loader import load_base_model
from loraserve.training.run import TrainingRun, make_base_trainable, restore_inference_layout
from loraserve.training.spec import JobRequest, prepare

DATA = "\n".join(
    json.dumps({"prompt": f"color {c} ->", "completion": f" {w}"})
    for c, w in [("red", "apple"), ("blue", "sky"), ("green", "grass"), ("white", "snow")]
).encode()


def served_base(toy):
    """The toy base after one inference forward, as a serving engine has run it: bitsandbytes
    may have repacked its CPU weights then (AVX512-BF16 CPUs)."""
    loaded = load_base_model(str(toy.base), "nf4", "cpu", "float32")
    with torch.inference_mode():
        loaded.model(torch.tensor([[1, 2, 3]]))
    return loaded


def served_run(toy, **options) -> TrainingRun:
    """A TrainingRun on the served toy base wrapped as the engine wraps it (slot table, paged
    attention)."""
    loaded = served_base(toy)
    slots = SlotTable.attach(loaded.model, 2, 16, loaded.dtype, loaded.device)
    loaded.model.config._attn_implementation = register()
    request = JobRequest("x", DATA, eval_fraction=0.0, **options)
    spec = prepare(request, "", loaded.tokenizer, list(slots.layers), 16, 256, 1 << 20)
    eos = {loaded.tokenizer.eos_token_id}
    return TrainingRun(spec, loaded.model, loaded.tokenizer, slots.shapes, loaded.device, eos, 2048)


def peft_twin(toy, run: TrainingRun):
    """PEFT on another load of the same served base, with the run's A and B copied in."""
    from peft import LoraConfig, get_peft_model

    loaded = served_base(toy)
    make_base_trainable(loaded.model)  # the same round trip of any packed weights
    config = LoraConfig(r=run.lora.rank, lora_alpha=run.lora.alpha, target_modules="all-linear")
    model = get_peft_model(loaded.model, config)
    for name in run.lora.a:
        module = model.base_model.model.get_submodule(name)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(run.lora.a[name])
            module.lora_B["default"].weight.copy_(run.lora.b[name])
    return model


def test_loss_and_gradients_equal_peft(toy) -> None:
    run = served_run(toy, steps=4, batch_size=4)
    torch.manual_seed(1)
    for b in run.lora.b.values():  # non-zero B, so gradients reach A and the layers below
        with torch.no_grad():
            b.normal_(std=0.02)
    model = peft_twin(toy, run)
    ids, labels, mask = next(run.batches)
    labelled = (labels[:, 1:] != -100).sum()
    ours = run._loss_sum(ids, labels, mask) / labelled
    ours.backward()
    theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    for name in run.lora.a:
        module = model.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            run.lora.a[name].grad, module.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-7
        )
        torch.testing.assert_close(
            run.lora.b[name].grad, module.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-7
        )


def test_micro_batches_accumulate_to_the_whole_batch(toy) -> None:
    whole = served_run(toy, steps=3, batch_size=4)
    split = served_run(toy, steps=3, batch_size=4)
    split.micro_batch_tokens = 1  # one example per slice
    while not whole.training_done:
        whole.run_slice()
    slices = 0
    while not split.training_done:
        split.run_slice()
        slices += 1
    assert slices == 3 * 4
    assert split.losses == pytest.approx(whole.losses, rel=1e-4)
    for name in whole.lora.a:
        torch.testing.assert_close(split.lora.a[name], whole.lora.a[name], rtol=1e-4, atol=1e-6)


def test_training_unpacks_cpu_weights_and_serving_gets_them_back_bit_for_bit(toy) -> None:
    from bitsandbytes.nn import Linear4bit

    loaded = served_base(toy)
    ids = torch.tensor([[1, 5, 9, 13, 40]])
    layers = [m for m in loaded.model.modules() if isinstance(m, Linear4bit)]
    flags = [layer.support_avx512bf16_for_cpu for layer in layers]
    with torch.inference_mode():
        before = loaded.model(ids).logits
    make_base_trainable(loaded.model)
    for layer in layers:  # nothing left in the layout that has no backward pass
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert layer.support_avx512bf16_for_cpu is False
    restore_inference_layout(loaded.model)
    make_base_trainable(loaded.model)  # a second job
    restore_inference_layout(loaded.model)
    assert [layer.support_avx512bf16_for_cpu for layer in layers] == flags
    with torch.inference_mode():
        after = loaded.model(ids).logits
    assert torch.equal(before, after)  # serving after a job is what it was before


def test_select_modules() -> None:
    adapted = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert select_modules(adapted, "all-linear") == adapted
    assert select_modules(adapted, " q_proj ") == [adapted[0], adapted[2]]
    with pytest.raises(InvalidArgument, match="lm_head not adapted by this server"):
        select_modules(adapted, "q_proj,lm_head")
