"""Loads the base model once: a Hugging Face causal LM (or a GGUF file), quantized with bitsandbytes.

NF4 with double quantization by default; fp4, int8 and unquantized too. On CUDA when
available, else on the CPU. bitsandbytes' CPU 4-bit kernel needs each layer's output size
divisible by 32: such layers stay unquantized, with a logged reason, instead of crashing.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraserve.config import ConfigError
from loraserve.gguf import convert, gguf_file_of
from loraserve.paths import default_cache_dir

log = logging.getLogger(__name__)

# bitsandbytes' CPU 4-bit kernel works on output blocks of this many features.
CPU_4BIT_OUT_MULTIPLE = 32
# Modules never quantized: the output head keeps full precision, as bitsandbytes does by default.
KEEP_FULL_PRECISION = ("lm_head",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


@dataclass
class LoadedModel:
    """The resident base model and what the rest of the server needs to know about it."""

    model: nn.Module
    tokenizer: Any
    name: str
    architecture: str
    quantization: str
    device: torch.device
    dtype: torch.dtype
    max_context_length: int
    model_bytes: int

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a config error."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda requested but no CUDA device is available")
    return torch.device("cuda:0" if name == "cuda" else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[name]


def layers_to_keep_unquantized(model_config: Any, device: torch.device, quantization: str) -> dict[str, str]:
    """Linear layers the quantizer must skip, with the reason, found on a meta-device copy."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    keep: dict[str, str] = {}
    for name, module in skeleton.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.split(".")[-1] in KEEP_FULL_PRECISION:
            keep[name] = "output head kept in full precision"
        elif (
            device.type == "cpu"
            and quantization in ("nf4", "fp4")
            and module.out_features % CPU_4BIT_OUT_MULTIPLE
        ):
            keep[name] = (
                f"out_features={module.out_features} is not a multiple of {CPU_4BIT_OUT_MULTIPLE} "
                "(bitsandbytes CPU 4-bit kernel)"
            )
    return keep


def quantization_config(quantization: str, double_quant: bool, dtype: torch.dtype, skip: list[str]) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


def check_readable(model_path: str) -> None:
    """Names a model folder or file this process may not read. transformers reports one as
    missing ("No such file or directory"), which misleads when the cause is its mode, such as
    0600 files written on the host and read by a container's other user."""
    import os

    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        return  # a hub id or a single file: its loader reports it

    def denied(path: Path) -> bool:
        return not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0))

    if denied(folder):
        path = folder
    else:
        path = next((p for p in sorted(folder.iterdir()) if denied(p)), None)
        if path is None:
            return
    info = path.stat()
    raise ConfigError(
        f"--model: permission denied reading {path} (mode {info.st_mode & 0o777:04o}, owner uid "
        f"{info.st_uid}; this process runs as uid {os.getuid()}): make it readable, "
        "e.g. chmod -R a+rX on the model folder"
    )


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_path: str,
    quantization: str = "nf4",
    device_name: str = "auto",
    dtype_name: str = "auto",
    double_quant: bool = True,
    max_context_length: int | None = None,
) -> LoadedModel:
    """Loads tokenizer and model, quantized as asked, in inference mode on the chosen device."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    model_name = model_path
    gguf_file = gguf_file_of(Path(model_path).expanduser())
    if gguf_file is not None:
        model_name = gguf_file.stem
        model_path = str(convert(gguf_file, default_cache_dir()))
    hf_logging.disable_progress_bar()
    check_readable(model_path)
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model: cannot read model config from {model_path}: {error}") from None

    keep = layers_to_keep_unquantized(model_config, device, quantization) if quantization != "none" else {}
    for name, reason in keep.items():
        if "output head" not in reason:
            log.warning("layer %s stays unquantized: %s", name, reason)
    quant = quantization_config(quantization, double_quant, dtype, sorted(keep))
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}}
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        raise ConfigError(f"--model: cannot load {model_path}: {error}") from None
    model.eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(model_path)

    limit = getattr(model_config, "max_position_embeddings", None) or 2048
    context = min(max_context_length or limit, limit)
    model_bytes = model.get_memory_footprint()
    log.info(
        "loaded %s (%s) quantization=%s dtype=%s device=%s: %.1f MiB of weights, context %d",
        model_path,
        type(model).__name__,
        quantization,
        dtype,
        device,
        model_bytes / 2**20,
        context,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=model_name,
        architecture=type(model).__name__,
        quantization=quantization,
        device=device,
        dtype=dtype,
        max_context_length=context,
        model_bytes=model_bytes,
    )
