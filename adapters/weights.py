"""Reads one adapter's safetensors and checks every tensor against the base, within fixed bounds.

The result holds, per adapted base module, `a` [r, in] and `b` [out, r] as zero-copy views of
the file's bytes in their stored dtype, and the module's LoRA scale. This runs on adapter-load
worker threads, so it does no torch arithmetic (that would start a second OpenMP thread team
beside the engine's and slow every engine step): the finiteness and magnitude checks below are
numpy on the raw bits, and dtype conversion and scaling happen while copying into a device slot
(adapters.layer.SlotTable.set_slot, which checks finiteness again), on the engine's thread.

Bounds, all checked from the file's size and header before its data is read:
- the file is at most `ReadLimits.max_adapter_bytes` and at most what its config implies (every
  adaptable module of the base at the config's highest rank, 8 bytes per element, plus a header);
- the header is at most `HEADER_BYTES_PER_TENSOR` per possible tensor (2 × adaptable modules,
  plus a small slack), and holds at most that many tensors, so a crafted header with a million
  entries is refused before it is parsed.

Parsing is the `safetensors` package's (`safetensors.deserialize`: bounds-checked header, shapes,
offsets that cover the data exactly). Not `safe_open(..., framework="numpy")`: numpy has no
bfloat16, so it refuses the BF16 tensors many adapters (and the bench's) are saved in ("data
type 'bfloat16' not understood"); and it maps the file by path, while the store hands us a
descriptor opened without following links. Nor a lazy mmap of our own: a file truncated or
rewritten under a live mapping (replacing adapter files is a supported operation) raises SIGBUS
in the server. So the file, bounded first, is read once with pread and handed to the library.

Every refusal names the tensor, field or limit at fault.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import torch

from loraserve.adapters.peft_config import (
    LoraAdapterConfig,
    ModuleSpec,
    parse_adapter_config_bytes,
    resolve_modules,
)
from loraserve.adapters.store import WEIGHTS_FILE, OpenedAdapter, read_exactly
from loraserve.errors import FailedPrecondition

# base_model.model.<module>.lora_A.weight, as PEFT saves it (adapter name stripped).
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
REFUSED_KEYS = (
    ("lora_embedding_", "LoRA on embeddings"),
    ("lora_magnitude_vector", "DoRA magnitude vectors"),
    ("modules_to_save", "modules_to_save weights"),
    ("trainable_token", "trainable tokens"),
)
# dtype name -> (torch dtype, unsigned int of the same width, sign-stripping mask, first non-finite bits)
DTYPES = {
    "F16": (torch.float16, np.uint16, 0x7FFF, 0x7C00),
    "BF16": (torch.bfloat16, np.uint16, 0x7FFF, 0x7F80),
    "F32": (torch.float32, np.uint32, 0x7FFFFFFF, 0x7F800000),
    "F64": (torch.float64, np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}
MAX_ELEMENT_BYTES = 8  # F64
# A PEFT header entry is ~150 bytes (name, dtype, shape, offsets); this leaves room for long names.
HEADER_BYTES_PER_TENSOR = 512
HEADER_SLACK_BYTES = 64 * 1024  # __metadata__ and whitespace
# Tensors allowed past 2 per adaptable module, so that a few stray ones (a DoRA vector, a bias)
# get their own, precise refusal instead of the count's.
TENSOR_SLACK = 64
# A stored weight (of A, or of B times the LoRA scale) above this makes the LoRA term of one
# layer overflow even float32 after a few layers (1e18 weights wedged sampling in issue 13);
# trained adapters stay below 1e2. float16 compute gets a tighter bound (its max is 65504).
MAX_ABS_WEIGHT = 1e4
MAX_ABS_WEIGHT_FP16 = 1e2


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


@dataclass(frozen=True)
class ReadLimits:
    """What an adapter is checked against: the base's adaptable modules and the server's limits."""

    base_modules: dict[str, tuple[int, int]]  # name -> (in, out)
    max_rank: int
    max_adapter_bytes: int = 0  # 0: default_max_adapter_bytes(base_modules, max_rank)
    max_abs_weight: float = MAX_ABS_WEIGHT

    @property
    def max_tensors(self) -> int:
        return 2 * len(self.base_modules) + TENSOR_SLACK

    @property
    def max_header_bytes(self) -> int:
        return HEADER_SLACK_BYTES + HEADER_BYTES_PER_TENSOR * self.max_tensors

    @property
    def file_limit(self) -> int:
        return self.max_adapter_bytes or default_max_adapter_bytes(self.base_modules, self.max_rank)


def implied_adapter_bytes(base_modules: dict[str, tuple[int, int]], rank: int) -> int:
    """The largest valid file of an adapter of this rank: every module, 8-byte elements, a full header."""
    data = sum(rank * (i + o) for i, o in base_modules.values()) * MAX_ELEMENT_BYTES
    header = HEADER_SLACK_BYTES + HEADER_BYTES_PER_TENSOR * (2 * len(base_modules) + TENSOR_SLACK)
    return 8 + header + data


def default_max_adapter_bytes(base_modules: dict[str, tuple[int, int]], max_rank: int) -> int:
    """--max-adapter-bytes when not set: the largest valid adapter at the server's max rank."""
    return implied_adapter_bytes(base_modules, max_rank)


def max_abs_weight_for(compute_dtype: torch.dtype) -> float:
    return MAX_ABS_WEIGHT_FP16 if compute_dtype == torch.float16 else MAX_ABS_WEIGHT


def _refusal_for(key: str) -> str | None:
    for marker, what in REFUSED_KEYS:
        if marker in key:
            return f"tensor {key}: {what} are not supported"
    if key.endswith(".bias"):
        return f"tensor {key}: LoRA biases are not supported"
    return None


def _bad(why: str) -> FailedPrecondition:
    return FailedPrecondition(f"{WEIGHTS_FILE} is not a valid safetensors file: {why}")


def _check_size(
    size: int, config: LoraAdapterConfig, plan: dict[str, ModuleSpec], limits: ReadLimits
) -> None:
    limit = limits.file_limit
    if size > limit:
        raise FailedPrecondition(
            f"{WEIGHTS_FILE} is {size} bytes, above the server's limit of {limit} bytes per adapter "
            "(--max-adapter-bytes); refused before reading"
        )
    rank = max([config.max_rank, *(spec.rank for spec in plan.values())])
    implied = implied_adapter_bytes(limits.base_modules, rank)
    if size > implied:
        raise FailedPrecondition(
            f"{WEIGHTS_FILE} is {size} bytes, more than adapter_config.json allows (at most {implied} "
            f"bytes for rank {rank} on this base); refused before reading"
        )


def _read_tensors(opened: OpenedAdapter, limits: ReadLimits) -> tuple[list[tuple[str, dict]], memoryview]:
    """The file's tensors (name, {dtype, shape, data}) and its data section, after bounding the header."""
    size = opened.weights_size
    if size < 8:
        raise _bad("shorter than its header")
    (header_len,) = np.frombuffer(read_exactly(opened.weights_fd, 0, 8, WEIGHTS_FILE), dtype="<u8")
    header_len = int(header_len)
    if header_len > limits.max_header_bytes:
        raise _bad(
            f"header of {header_len} bytes is above the limit of {limits.max_header_bytes} bytes "
            f"for at most {limits.max_tensors} tensors (2 per adaptable module of this base, and a few more)"
        )
    if header_len > size - 8:
        raise _bad(f"header length {header_len} exceeds the file")
    header = read_exactly(opened.weights_fd, 8, header_len, WEIGHTS_FILE)
    count = header.count(b'"data_offsets"')
    if count > limits.max_tensors:
        raise _bad(
            f"header lists {count} tensors, more than the {limits.max_tensors} an adapter of this "
            "base can have (2 per adaptable module, and a few more)"
        )
    data = read_exactly(opened.weights_fd, 0, size, WEIGHTS_FILE)
    try:
        return safetensors.deserialize(data), memoryview(data)[8 + header_len :]
    except (safetensors.SafetensorError, ValueError, OverflowError) as error:
        raise _bad(str(error).removeprefix("Error while deserializing: ")) from None


def _peak_bits(data: bytes | memoryview, dtype: str) -> int:
    """The largest |w| of the buffer, as its sign-stripped bits: IEEE 754 orders magnitudes like
    these integers, so this is one integer pass with no float temporaries (and NaN/inf sort last)."""
    _, uint, mask, _ = DTYPES[dtype]
    return int(np.bitwise_and(np.frombuffer(data, dtype=uint), uint(mask)).max())


def _all_within(tensors: list[tuple[str, dict]], body: memoryview, max_abs: float) -> bool:
    """One pass over the whole data section when every tensor has one supported dtype: True when
    every weight is finite and at most `max_abs` (then no tensor needs its own pass)."""
    dtypes = {info["dtype"] for _, info in tensors}
    if len(dtypes) != 1 or not len(body):
        return False
    (dtype,) = dtypes
    if dtype not in DTYPES:
        return False
    peak = _peak_bits(body, dtype)
    return peak < DTYPES[dtype][3] and _bits_to_float(peak, dtype) <= max_abs


def _as_tensor(key: str, info: dict, max_abs: float, scale: float, check: bool = True) -> torch.Tensor:
    """A zero-copy torch view of one tensor's bytes, after checking its magnitude (numpy, raw bits)."""
    dtype = info["dtype"]
    if dtype not in DTYPES:
        raise FailedPrecondition(
            f"tensor {key}: dtype {dtype} is not supported (LoRA weights must be F16, BF16, F32 or F64)"
        )
    torch_dtype, _, _, non_finite = DTYPES[dtype]
    data = info["data"]
    shape = list(info["shape"])
    if not data:
        return torch.empty(shape, dtype=torch_dtype)
    if not check:
        return torch.frombuffer(data, dtype=torch_dtype).view(shape)
    peak_bits = _peak_bits(data, dtype)
    if peak_bits >= non_finite:
        raise FailedPrecondition(f"tensor {key}: LoRA weights contain NaN or infinity")
    peak = _bits_to_float(peak_bits, dtype) * scale
    if peak > max_abs:
        raise FailedPrecondition(
            f"tensor {key}: weights reach |w| = {peak:.3g}{' after the LoRA scale' if scale != 1 else ''}, "
            f"above the bound of {max_abs:g} (max |w|) beyond which the forward pass overflows"
        )
    return torch.frombuffer(data, dtype=torch_dtype).view(shape)


def _bits_to_float(bits: int, dtype: str) -> float:
    if dtype == "BF16":
        return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])
    _, uint, _, _ = DTYPES[dtype]
    floats = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]
    return float(np.array([bits], dtype=uint).view(floats)[0])


def read_adapter(opened: OpenedAdapter, limits: ReadLimits) -> AdapterWeights:
    """Parses an opened adapter and validates it against `limits`."""
    config = parse_adapter_config_bytes(opened.read_config())
    plan = resolve_modules(config, limits.base_modules)
    _check_size(opened.weights_size, config, plan, limits)
    tensors, body = _read_tensors(opened, limits)
    if not tensors:
        raise FailedPrecondition(f"{WEIGHTS_FILE} holds no tensors")
    factors: dict[str, dict[str, tuple[str, dict]]] = {}
    for key, info in tensors:
        refusal = _refusal_for(key)
        if refusal:
            raise FailedPrecondition(refusal)
        match = LORA_KEY.match(key)
        if match is None:
            raise FailedPrecondition(f"tensor {key}: not a LoRA A/B weight this server understands")
        module, kind = match.group("module"), match.group("kind")
        if module not in limits.base_modules:
            leaf = module.rsplit(".", 1)[-1]
            raise FailedPrecondition(
                f"tensor {key}: module {module} ({leaf}) is not a LoRA target this base supports"
            )
        if module not in plan:
            raise FailedPrecondition(
                f"tensor {key}: module {module} is not targeted by adapter_config.json "
                "(target_modules / layers_to_transform)"
            )
        factors.setdefault(module, {})[kind] = (key, info)

    checked: dict[str, tuple[tuple[str, dict], tuple[str, dict], float]] = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise FailedPrecondition(f"module {module}: {missing}.weight is missing")
        (a_key, a), (b_key, b) = pair["A"], pair["B"]
        a_shape, b_shape = tuple(a["shape"]), tuple(b["shape"])
        in_features, out_features = limits.base_modules[module]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise FailedPrecondition(f"module {module}: lora_A/lora_B must be 2-D matrices")
        rank = a_shape[0]
        if a_shape[1] != in_features or b_shape[0] != out_features or b_shape[1] != rank:
            raise FailedPrecondition(
                f"module {module}: shapes lora_A {a_shape} / lora_B {b_shape} do not fit "
                f"the base layer (in={in_features}, out={out_features})"
            )
        spec = plan[module]
        if rank != spec.rank:
            raise FailedPrecondition(
                f"module {module}: rank {rank} in the weights but {spec.rank} in adapter_config.json"
            )
        if rank > limits.max_rank:
            raise FailedPrecondition(
                f"module {module}: rank {rank} is above the server's max_lora_rank {limits.max_rank}"
            )
        checked[module] = ((a_key, a), (b_key, b), config.scale(spec.alpha, rank))
    # The magnitude bound applies to A and to B times its scale: one pass over the whole file
    # against the strictest form of it, and per tensor (to name the culprit) only if that fails.
    max_scale = max([1.0, *(abs(scale) for _, _, scale in checked.values())])
    check = not _all_within(tensors, body, limits.max_abs_weight / max_scale)
    modules = {
        module: ModuleLoRA(
            a=_as_tensor(a_key, a, limits.max_abs_weight, 1.0, check),
            b=_as_tensor(b_key, b, limits.max_abs_weight, scale, check),
            scale=scale,
        )
        for module, ((a_key, a), (b_key, b), scale) in checked.items()
    }
    if not modules:
        raise FailedPrecondition("the adapter adapts no module")
    return AdapterWeights(modules=modules, config=config)


def read_adapter_weights(
    config_path: Path,
    weights_path: Path,
    base_modules: dict[str, tuple[int, int]],
    max_rank: int,
    max_adapter_bytes: int = 0,
    max_abs_weight: float = MAX_ABS_WEIGHT,
) -> AdapterWeights:
    """`read_adapter` on two paths (tools and tests; the server reads through AdapterStore.open)."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    config_fd = os.open(config_path, flags)
    try:
        weights_fd = os.open(weights_path, flags)
    except BaseException:
        os.close(config_fd)
        raise
    limits = ReadLimits(base_modules, max_rank, max_adapter_bytes, max_abs_weight)
    with OpenedAdapter(str(config_path.parent), config_fd, weights_fd) as opened:
        return read_adapter(opened, limits)
