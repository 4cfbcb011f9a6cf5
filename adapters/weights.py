"""Reads one adapter's safetensors and checks every tensor against the base, without computing.

The result holds, per adapted base module, `a` [r, in] and `b` [out, r] as zero-copy views of
the file's bytes in their stored dtype, and the module's LoRA scale. This runs on adapter-load
worker threads, so it does no tensor arithmetic (which would start a second OpenMP thread team
beside the engine's and slow every engine step): dtype conversion, scaling and the finiteness
check happen while copying into a device slot (adapters.layer.SlotTable.set_slot), on the
engine's thread. Every refusal names the tensor or field at fault.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from loraserve.adapters.peft_config import LoraAdapterConfig, read_adapter_config
from loraserve.errors import FailedPrecondition

# base_model.model.<module>.lora_A.weight, as PEFT saves it (adapter name stripped).
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
REFUSED_KEYS = (
    ("lora_embedding_", "LoRA on embeddings"),
    ("lora_magnitude_vector", "DoRA magnitude vectors"),
    ("modules_to_save", "modules_to_save weights"),
    ("trainable_tokens", "trainable tokens"),
)


SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class ModuleLoRA:
    """LoRA factors of one base module: y += scale * x @ a.T @ b.T."""

    a: torch.Tensor  # [r, in], stored dtype
    b: torch.Tensor  # [out, r], stored dtype
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
    """All tensors of a safetensors file as zero-copy views of its bytes (no tensor arithmetic).

    The format: an 8-byte little-endian header length, a JSON header mapping names to dtype,
    shape and byte offsets, then the data. Anything inconsistent is FailedPrecondition.
    """

    def bad(why: str) -> FailedPrecondition:
        return FailedPrecondition(f"{path.name} is not a valid safetensors file: {why}")

    try:
        with open(path, "rb") as handle:
            data = bytearray(os.fstat(handle.fileno()).st_size)
            handle.readinto(data)  # one copy, into a writable buffer the tensors can view
    except OSError as error:
        raise bad(str(error)) from None
    if len(data) < 8:
        raise bad("shorter than its header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise bad(f"header length {header_len} exceeds the file")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    body = memoryview(data)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name}: unsupported dtype or malformed entry") from None
        size = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= len(body) or end - begin != size:
            raise bad(f"tensor {name}: offsets do not match its shape {shape}")
        if size == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        tensors[name] = torch.frombuffer(body[begin:end], dtype=dtype).view(shape)
    return tensors


def read_adapter_weights(
    config_path: Path,
    weights_path: Path,
    base_modules: dict[str, tuple[int, int]],
    max_rank: int,
) -> AdapterWeights:
    """Parses an adapter and validates it against `base_modules` (name -> (in, out))."""
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
        modules[module] = ModuleLoRA(a=a, b=b, scale=config.scale_for(module, rank))
    return AdapterWeights(modules=modules, config=config)
