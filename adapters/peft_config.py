"""Parses a PEFT `adapter_config.json` into the few values serving needs, refusing the rest.

Honoured: `r`, `lora_alpha`, `use_rslora` (scale alpha/√r), `target_modules` (list, regex or
`all-linear`), `exclude_modules`, `rank_pattern`, `alpha_pattern`, `layers_to_transform`,
`layers_pattern`. Refused with a message naming the field: anything that would change the
forward pass in a way the batched LoRA layer does not compute (DoRA, `modules_to_save`,
trained biases, layer replication, trainable tokens, initialisations that rewrite the base).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraserve.errors import FailedPrecondition

# init_lora_weights values whose adapters only make sense on a base rewritten by them.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "mica")
# Fields that must be absent/false/empty: (field, what it is).
UNSUPPORTED_FIELDS = (
    ("use_dora", "DoRA"),
    ("modules_to_save", "modules_to_save (fully trained extra modules)"),
    ("lora_bias", "LoRA bias"),
    ("layer_replication", "layer replication"),
    ("trainable_token_indices", "trainable tokens"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ("target_parameters", "target_parameters (LoRA on parameters)"),
    ("use_qalora", "QALoRA"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("fan_in_fan_out", "fan_in_fan_out weights"),
)


@dataclass(frozen=True)
class LoraAdapterConfig:
    """What of adapter_config.json decides the forward pass."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None

    def rank_for(self, module_name: str) -> int:
        key = pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scale_for(self, module_name: str, rank: int) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module_name: str) -> bool:
        """Would PEFT have put a LoRA layer on this module (full name, e.g. model.layers.0.mlp.up_proj)?"""
        if self.exclude_modules is not None and _name_matches(self.exclude_modules, module_name):
            return False
        if self.target_modules is None or self.target_modules == "all-linear":
            matched = True  # the caller only asks about linear layers of the decoder
        else:
            matched = _name_matches(self.target_modules, module_name)
        if not matched:
            return False
        if self.layers_to_transform is not None and not isinstance(self.target_modules, str):
            index = layer_index(module_name, self.layers_pattern)
            return index is not None and index in self.layers_to_transform
        return True


def pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rank/alpha pattern lookup: a key matches a module name or a dotted suffix of it."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def layer_index(module_name: str, patterns: tuple[str, ...] | None) -> int | None:
    """PEFT's rule: the first numbered segment (after one of `patterns` when given)."""
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", module_name)
        return int(match.group(1)) if match else None
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", module_name)
        if match:
            return int(match.group(1))
    return None


def _name_matches(spec: tuple[str, ...] | str, module_name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, module_name) is not None
    return any(module_name == key or module_name.endswith("." + key) for key in spec)


def _as_tuple(value: Any, name: str, kind: type) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, kind):
        return (value,)
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, kind) for v in value):
        return tuple(value)
    raise FailedPrecondition(f"adapter_config.json: {name} must be a {kind.__name__} or a list of them")


def parse_adapter_config(raw: dict[str, Any]) -> LoraAdapterConfig:
    """Validates the parsed JSON; every refusal names the field."""
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise FailedPrecondition(f"adapter_config.json: peft_type {peft_type} is not supported (only LORA)")
    for name, what in UNSUPPORTED_FIELDS:
        if raw.get(name):
            raise FailedPrecondition(f"adapter_config.json: {name} is set; {what} is not supported")
    bias = raw.get("bias", "none")
    if bias not in (None, "none"):
        raise FailedPrecondition(f"adapter_config.json: bias={bias!r}; trained biases are not supported")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise FailedPrecondition(
            f"adapter_config.json: init_lora_weights={init!r} needs a base model rewritten by that "
            "initialisation; convert the adapter to plain LoRA first"
        )
    r = raw.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise FailedPrecondition(f"adapter_config.json: r must be a positive integer, got {r!r}")
    alpha = raw.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise FailedPrecondition(f"adapter_config.json: lora_alpha must be a number, got {alpha!r}")
    target = raw.get("target_modules")
    target_modules = target if isinstance(target, str) else _as_tuple(target, "target_modules", str)
    exclude = raw.get("exclude_modules")
    exclude_modules = exclude if isinstance(exclude, str) else _as_tuple(exclude, "exclude_modules", str)
    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    for name, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(patterns, dict):
            raise FailedPrecondition(f"adapter_config.json: {name} must be an object")
        for key, value in patterns.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise FailedPrecondition(f"adapter_config.json: {name}[{key!r}] must be a positive number")
            try:
                re.compile(key)
            except re.error as error:
                raise FailedPrecondition(
                    f"adapter_config.json: {name} key {key!r} is not a regex: {error}"
                ) from None
    for key, value in rank_pattern.items():
        if not float(value).is_integer():
            raise FailedPrecondition(f"adapter_config.json: rank_pattern[{key!r}] must be an integer")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise FailedPrecondition(
                f"adapter_config.json: target_modules is not a valid regex: {error}"
            ) from None
    layers = raw.get("layers_to_transform")
    layers_pattern = raw.get("layers_pattern")
    return LoraAdapterConfig(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        rank_pattern={k: int(v) for k, v in rank_pattern.items()},
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        layers_to_transform=_as_tuple(layers, "layers_to_transform", int),
        layers_pattern=_as_tuple(layers_pattern, "layers_pattern", str),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )


def read_adapter_config(path: Path) -> LoraAdapterConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FailedPrecondition(f"adapter_config.json is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise FailedPrecondition("adapter_config.json must hold a JSON object")
    return parse_adapter_config(raw)
