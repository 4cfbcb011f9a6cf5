"""Reads one adapter's safetensors, checks every tensor against the base, and prepares it for slots.

The result holds, per adapted base module, `a` [r, in] and `b` [out, r] with the LoRA scale
already folded into `b`, in the serving dtype on the CPU: what a device slot copy needs.
Every refusal names the tensor or field at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adapters.peft_config import LoraAdapterConfig, read_adapter_config
from server.errors import FailedPrecondition

# base_model.model.<module>.lora_A.weight, as PEFT saves it (adapter name stripped).
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
REFUSED_KEYS = (
    ("lora_embedding_", "LoRA on embeddings"),
    ("lora_magnitude_vector", "DoRA magnitude vectors"),
    ("modules_to_save", "modules_to_save weights"),
    ("trainable_tokens", "trainable tokens"),
)


@dataclass(frozen=True)
class ModuleLoRA:
    """LoRA factors of one base module: y += x @ a.T @ b.T (scale folded into b)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], times the module's scale
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter, in host memory."""

    modules: dict[str, ModuleLoRA]
    config: LoraAdapterConfig

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    @property
    def target_leaves(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})


def _refusal_for(key: str) -> str | None:
    for marker, what in REFUSED_KEYS:
        if marker in key:
            return f"tensor {key}: {what} are not supported"
    if key.endswith(".bias"):
        return f"tensor {key}: LoRA biases are not supported"
    return None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or FailedPrecondition when it is not one."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise FailedPrecondition(f"{path.name} is not a valid safetensors file: {error}") from None


def read_adapter_weights(
    config_path: Path,
    weights_path: Path,
    base_modules: dict[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
) -> AdapterWeights:
    """Parses, validates against `base_modules` (name -> (in, out)) and converts an adapter."""
    config = read_adapter_config(config_path)
    tensors = load_tensors(weights_path)
    if not tensors:
        raise FailedPrecondition(f"{weights_path.name} holds no tensors")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        refusal = _refusal_for(key)
        if refusal:
            raise FailedPrecondition(refusal)
        match = LORA_KEY.match(key)
        if match is None:
            raise FailedPrecondition(f"tensor {key}: not a LoRA A/B weight this server understands")
        module, kind = match.group("module"), match.group("kind")
        if module not in base_modules:
            leaf = module.rsplit(".", 1)[-1]
            raise FailedPrecondition(
                f"tensor {key}: module {module} ({leaf}) is not a LoRA target this base supports"
            )
        if not config.targets(module):
            raise FailedPrecondition(
                f"tensor {key}: module {module} is not targeted by adapter_config.json "
                "(target_modules / layers_to_transform)"
            )
        factors.setdefault(module, {})[kind] = tensor

    modules: dict[str, ModuleLoRA] = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise FailedPrecondition(f"module {module}: {missing}.weight is missing")
        a, b = pair["A"], pair["B"]
        in_features, out_features = base_modules[module]
        if a.dim() != 2 or b.dim() != 2:
            raise FailedPrecondition(f"module {module}: lora_A/lora_B must be 2-D matrices")
        rank = a.shape[0]
        if a.shape[1] != in_features or b.shape[0] != out_features or b.shape[1] != rank:
            raise FailedPrecondition(
                f"module {module}: shapes lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"the base layer (in={in_features}, out={out_features})"
            )
        expected = config.rank_for(module)
        if rank != expected:
            raise FailedPrecondition(
                f"module {module}: rank {rank} in the weights but {expected} in adapter_config.json"
            )
        if rank > max_rank:
            raise FailedPrecondition(
                f"module {module}: rank {rank} is above the server's max_lora_rank {max_rank}"
            )
        if not a.is_floating_point() or not b.is_floating_point():
            raise FailedPrecondition(f"module {module}: LoRA weights must be floating point")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise FailedPrecondition(f"module {module}: LoRA weights contain NaN or infinity")
        scale = config.scale_for(module, rank)
        modules[module] = ModuleLoRA(
            a=a.to(dtype).contiguous(), b=(b.float() * scale).to(dtype).contiguous(), scale=scale
        )
    return AdapterWeights(modules=modules, config=config)
