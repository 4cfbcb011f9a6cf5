"""The multi-adapter LoRA layer and the device slots it reads.

`SlotTable.attach(model)` wraps every targeted linear layer of the decoder (quantized or not:
bitsandbytes `Linear4bit` / `Linear8bitLt` subclass `nn.Linear`) in a `LoRALinear`, and
preallocates per module the stacked slot buffers A `[slots, r_max, in]` and B
`[slots, out, r_max]`. The base layer's own forward (quantized kernel included) runs first,
then the LoRA term is added for the tokens that have a slot by the table's LoRA backend
(`loraserve.adapters.lora_backends`, chosen at attach). The backend's plan is built once per
step from the token->slot mapping (`SlotTable.plan`) and reaches every layer through the step's
forward context (`loraserve.forward_context`), so no forward signature changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from loraserve.adapters.lora_backends import LoRABackend, LoRAPlan, select_lora_backend
from loraserve.adapters.slot_sizing import bytes_per_slot
from loraserve.adapters.weights import AdapterWeights
from loraserve.errors import FailedPrecondition
from loraserve.forward_context import current_forward_context

DECODER_LAYER_NAME = re.compile(r"(^|\.)layers\.\d+\.")


class LoRALinear(nn.Module):
    """y = base(x) + scale[s] · (x @ A[s]ᵀ) @ B[s]ᵀ for each token's slot s (-1 adds nothing)."""

    def __init__(
        self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, backend: LoRABackend, name: str = ""
    ) -> None:
        super().__init__()
        self.base = base
        self.name = name  # the module's name in the model (model.layers.0.self_attn.q_proj)
        self.backend = backend
        # Plain attributes, not buffers: the slot table owns them and they never go to a state dict.
        self.lora_a = a  # [slots, r_max, in]
        self.lora_b = b  # [slots, out, r_max]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        context = current_forward_context()
        if context is not None and context.training is not None:  # a training job's pass: its LoRA only
            return context.training.add(self.name, x, y)
        plan = context.lora if context is not None else None
        if plan is None:  # outside a step, or no token of the step has an adapter
            return y
        if y.dtype != self.lora_a.dtype:
            y = y.to(self.lora_a.dtype)
        y = y.contiguous()
        y2 = y.view(-1, y.shape[-1])  # [T, out]
        x2 = x.reshape(-1, x.shape[-1]).to(self.lora_a.dtype)  # [T, in]
        self.backend.apply(y2, x2, self.lora_a, self.lora_b, plan)
        return y


def find_lora_targets(model: nn.Module, leaves: list[str] | None = None) -> dict[str, nn.Linear]:
    """Linear layers inside decoder layers (model.layers.N...), optionally only these leaf names."""
    found = {}
    for name, module in model.named_modules():
        wanted = leaves is None or name.rsplit(".", 1)[-1] in leaves
        if isinstance(module, nn.Linear) and DECODER_LAYER_NAME.search(name) and wanted:
            found[name] = module
    return found


@dataclass
class SlotTable:
    """Device slots: per wrapped module, stacked A/B buffers; slot i holds one adapter."""

    num_slots: int
    max_rank: int
    dtype: torch.dtype
    device: torch.device
    backend: LoRABackend
    layers: dict[str, LoRALinear] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (in, out)
    rank_of_slot: list[int] = field(default_factory=list)
    slot_modules: list[set[str]] = field(default_factory=list)  # modules with non-zero weights per slot

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        leaves: list[str] | None = None,
        backend: str | LoRABackend = "auto",
    ) -> SlotTable:
        """Wraps the target layers of `model` in place and allocates the slot buffers.

        `backend`: a LoRA backend or its name (`auto`, `torch`, `reference`; see `select_lora_backend`).
        """
        if isinstance(backend, str):
            backend = select_lora_backend(backend, device)
        table = cls(
            num_slots,
            max_rank,
            dtype,
            device,
            backend,
            rank_of_slot=[0] * num_slots,
            slot_modules=[set() for _ in range(num_slots)],
        )
        targets = find_lora_targets(model, leaves)
        if not targets:
            raise ValueError("no linear layers to adapt were found in the model's decoder layers")
        for name, linear in targets.items():
            a = torch.zeros(num_slots, max_rank, linear.in_features, dtype=dtype, device=device)
            # B is [slots, out, r_max] but stored as its transpose [slots, r_max, out]: the expand
            # matmul (h @ Bᵀ) then reads each slot's rows contiguously, about twice as fast on CPU.
            b = torch.zeros(num_slots, max_rank, linear.out_features, dtype=dtype, device=device).transpose(
                1, 2
            )
            wrapper = LoRALinear(linear, a, b, backend, name)
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, wrapper)
            table.layers[name] = wrapper
            table.shapes[name] = (linear.in_features, linear.out_features)
        return table

    @property
    def target_leaves(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.layers})

    @property
    def bytes_per_slot(self) -> int:
        return bytes_per_slot(self.shapes, self.max_rank, self.dtype)

    def set_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Copies an adapter into a slot, converting to the slot dtype and folding the LoRA scale
        into B. Modules it does not adapt are zero (add nothing). Refuses non-finite weights,
        leaving the slot empty. Each element is written once: this is the adapter-load hot path."""
        sums = []
        for name, layer in self.layers.items():
            module = weights.modules.get(name)
            if module is None:
                if name in self.slot_modules[slot]:
                    layer.lora_a[slot].zero_()
                    layer.lora_b[slot].zero_()
                continue
            r = module.rank
            a, b = layer.lora_a[slot], layer.lora_b[slot]  # [r_max, in], [out, r_max]
            a[:r].copy_(module.a)
            if module.b.device == b.device:
                torch.mul(module.b, module.scale, out=b[:, :r])
            else:
                b[:, :r].copy_(module.b).mul_(module.scale)
            if r < self.max_rank:
                a[r:].zero_()
                b[:, r:].zero_()
            sums += [a[:r].sum(), b[:, :r].sum()]  # NaN or infinity anywhere makes its sum non-finite
        self.slot_modules[slot] = set(weights.modules)
        self.rank_of_slot[slot] = weights.max_rank
        if sums and not bool(torch.isfinite(torch.stack(sums)).all()):
            self.clear_slot(slot)
            raise FailedPrecondition("LoRA weights contain NaN or infinity")

    def clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.lora_a[slot].zero_()
            layer.lora_b[slot].zero_()
        self.rank_of_slot[slot] = 0
        self.slot_modules[slot] = set()

    def plan(self, slot_of_token: list[int]) -> LoRAPlan | None:
        """The backend's plan for a step whose token t has slot slot_of_token[t] (-1: base only),
        or None when no token has one (layers then skip the LoRA term). Once per step, on the host."""
        if all(s < 0 for s in slot_of_token):
            return None
        return self.backend.plan(slot_of_token, self.rank_of_slot)
