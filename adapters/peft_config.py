"""Parses a PEFT `adapter_config.json` into the few values serving needs, refusing the rest.

Honoured: `r`, `lora_alpha`, `use_rslora` (scale alpha/√r), `target_modules` (list, regex or
`all-linear`), `exclude_modules`, `rank_pattern`, `alpha_pattern`, `layers_to_transform`,
`layers_pattern`. Refused with a message naming the field: anything that would change the
forward pass in a way the batched LoRA layer does not compute (DoRA, `modules_to_save`,
trained biases, layer replication, trainable tokens, initialisations that rewrite the base).

The regexes an adapter brings (`target_modules`, `exclude_modules`, `rank_pattern` and
`alpha_pattern` keys, `layers_pattern`) are hostile input: a backtracking pattern can take
seconds per module name. They are matched only against the base model's fixed list of module
names (`resolve_modules`), with the `regex` package (which releases the GIL while matching, so
other threads keep serving) under one time budget per adapter, refused over a length limit, and
the result is cached per config.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import regex

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
# Longest regex accepted in any pattern field; real ones are tens of characters.
MAX_PATTERN_CHARS = 1024
# Most keys in rank_pattern / alpha_pattern (one per module of a large model is a few hundred).
MAX_PATTERN_KEYS = 4096
# Wall-clock budget for matching one adapter's patterns against every module name: a base, plus
# a little per (module, pattern) pair so that a large legitimate rank_pattern on a large model
# (hundreds of keys × hundreds of modules) is not refused, up to a cap that bounds any attack.
MATCH_BUDGET_SECONDS = 0.5
MATCH_SECONDS_PER_PAIR = 5e-6
MATCH_BUDGET_CAP_SECONDS = 1.0
# Resolved module plans kept (per distinct config and module list).
PLAN_CACHE_SIZE = 256


@dataclass(frozen=True)
class LoraAdapterConfig:
    """What of adapter_config.json decides the forward pass (hashable: plans are cached by it)."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    layers_to_transform: frozenset[int] | None = None  # a set: membership is tested per module
    layers_pattern: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None

    @property
    def max_rank(self) -> int:
        """The highest rank any module of this adapter may have."""
        return max([self.r, *(rank for _, rank in self.rank_pattern)])

    def rank_for(self, module_name: str, deadline: float | None = None) -> int:
        key = pattern_key(self.rank_pattern, module_name, deadline)
        return int(dict(self.rank_pattern)[key]) if key is not None else self.r

    def alpha_for(self, module_name: str, deadline: float | None = None) -> float:
        key = pattern_key(self.alpha_pattern, module_name, deadline)
        return float(dict(self.alpha_pattern)[key]) if key is not None else self.lora_alpha

    def scale(self, alpha: float, rank: int) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module_name: str, deadline: float | None = None) -> bool:
        """Would PEFT have put a LoRA layer on this module (full name, e.g. model.layers.0.mlp.up_proj)?"""
        if self.exclude_modules is not None and _name_matches(self.exclude_modules, module_name, deadline):
            return False
        if self.target_modules is None or self.target_modules == "all-linear":
            matched = True  # the caller only asks about linear layers of the decoder
        else:
            matched = _name_matches(self.target_modules, module_name, deadline)
        if not matched:
            return False
        if self.layers_to_transform is not None and not isinstance(self.target_modules, str):
            index = layer_index(module_name, self.layers_pattern, deadline)
            return index is not None and index in self.layers_to_transform
        return True


@dataclass(frozen=True)
class ModuleSpec:
    """What the config says about one targeted base module."""

    rank: int
    alpha: float


# ----------------------------------------------------------------------------- matching
def _timeout(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


@functools.lru_cache(maxsize=8192)
def _compile(pattern: str) -> regex.Pattern:
    # regex's own cache is smaller than the patterns of one large rank_pattern times its wrappers.
    return regex.compile(pattern)


def _match(pattern: str, name: str, deadline: float | None, full: bool = False) -> regex.Match | None:
    compiled = _compile(pattern)
    method = compiled.fullmatch if full else compiled.match
    return method(name, timeout=_timeout(deadline), concurrent=True)


def pattern_key(
    patterns: Iterable[tuple[str, Any]], module_name: str, deadline: float | None = None
) -> str | None:
    """PEFT's rank/alpha pattern lookup: a key matches a module name or a dotted suffix of it."""
    for key, _ in patterns:
        if _match(rf"(.*\.)?({key})$", module_name, deadline):
            return key
    return None


def layer_index(
    module_name: str, patterns: tuple[str, ...] | None, deadline: float | None = None
) -> int | None:
    """PEFT's rule: the first numbered segment (after one of `patterns` when given)."""
    if not patterns:
        match = _match(r".*?\.[^.]*\.(\d+)\.", module_name, deadline)
        return int(match.group(1)) if match else None
    for pattern in patterns:
        match = _match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", module_name, deadline)
        if match:
            return int(match.group(1))
    return None


def _name_matches(spec: tuple[str, ...] | str, module_name: str, deadline: float | None) -> bool:
    if isinstance(spec, str):
        return _match(spec, module_name, deadline, full=True) is not None
    return any(module_name == key or module_name.endswith("." + key) for key in spec)


_plans: OrderedDict[tuple[LoraAdapterConfig, tuple[str, ...]], dict[str, ModuleSpec]] = OrderedDict()
_plans_lock = threading.Lock()


def match_budget(config: LoraAdapterConfig, num_modules: int) -> float:
    """Seconds allowed for resolving this config against this many module names."""
    patterns = 3 + len(config.rank_pattern) + len(config.alpha_pattern) + len(config.layers_pattern or ())
    return min(
        MATCH_BUDGET_CAP_SECONDS, MATCH_BUDGET_SECONDS + MATCH_SECONDS_PER_PAIR * patterns * num_modules
    )


def resolve_modules(
    config: LoraAdapterConfig, module_names: Iterable[str], budget: float | None = None
) -> dict[str, ModuleSpec]:
    """The base modules the config targets, with their rank and alpha.

    Matches the config's patterns against the given (fixed) module names within `budget`
    seconds in all (default: `match_budget`), else FailedPrecondition naming the fields; cached
    per (config, names).
    """
    names = tuple(module_names)
    key = (config, names)
    with _plans_lock:
        plan = _plans.get(key)
        if plan is not None:
            _plans.move_to_end(key)
            return plan
    if budget is None:
        budget = match_budget(config, len(names))
    deadline = time.monotonic() + budget
    try:
        plan = {
            name: ModuleSpec(config.rank_for(name, deadline), config.alpha_for(name, deadline))
            for name in names
            if config.targets(name, deadline)
        }
    except TimeoutError:
        raise FailedPrecondition(
            "adapter_config.json: matching target_modules / exclude_modules / rank_pattern / "
            f"alpha_pattern / layers_pattern against the model's modules took over {budget:g} s; "
            "these patterns are too expensive (catastrophic backtracking?), simplify them"
        ) from None
    with _plans_lock:
        _plans[key] = plan
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


# ----------------------------------------------------------------------------- parsing
def _as_tuple(value: Any, name: str, kind: type) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, kind) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple, set)) and all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    raise FailedPrecondition(f"adapter_config.json: {name} must be a {kind.__name__} or a list of them")


def _check_regex(pattern: str, where: str) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise FailedPrecondition(
            f"adapter_config.json: {where} is {len(pattern)} characters long, above the "
            f"{MAX_PATTERN_CHARS}-character limit for a pattern"
        )
    try:
        regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError) as error:
        raise FailedPrecondition(f"adapter_config.json: {where} is not a valid regex: {error}") from None


def _names_field(raw: dict[str, Any], name: str) -> tuple[str, ...] | str | None:
    value = raw.get(name)
    if isinstance(value, str):
        _check_regex(value, name)
        return value
    names = _as_tuple(value, name, str)
    if names is not None and (
        len(names) > MAX_PATTERN_KEYS or any(len(n) > MAX_PATTERN_CHARS for n in names)
    ):
        raise FailedPrecondition(
            f"adapter_config.json: {name} has more than {MAX_PATTERN_KEYS} entries or one longer "
            f"than {MAX_PATTERN_CHARS} characters"
        )
    return names


def _pattern_field(raw: dict[str, Any], name: str) -> dict[str, Any]:
    patterns = raw.get(name) or {}
    if not isinstance(patterns, dict):
        raise FailedPrecondition(f"adapter_config.json: {name} must be an object")
    if len(patterns) > MAX_PATTERN_KEYS:
        raise FailedPrecondition(
            f"adapter_config.json: {name} has {len(patterns)} keys, above the limit of {MAX_PATTERN_KEYS}"
        )
    for key, value in patterns.items():
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise FailedPrecondition(f"adapter_config.json: {name}[{key[:80]!r}] must be a positive number")
        _check_regex(key, f"{name} key {key[:80]!r}")
    return patterns


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
    if alpha < 0:
        # PEFT would silently negate the update; a sign flip is almost surely a mistake, and
        # refusing is the safe reading.
        raise FailedPrecondition(f"adapter_config.json: lora_alpha must not be negative, got {alpha!r}")
    target_modules = _names_field(raw, "target_modules")
    exclude_modules = _names_field(raw, "exclude_modules")
    rank_pattern = _pattern_field(raw, "rank_pattern")
    alpha_pattern = _pattern_field(raw, "alpha_pattern")
    for key, value in rank_pattern.items():
        if not float(value).is_integer():
            raise FailedPrecondition(f"adapter_config.json: rank_pattern[{key[:80]!r}] must be an integer")
    layers = _as_tuple(raw.get("layers_to_transform"), "layers_to_transform", int)
    layers_pattern = _as_tuple(raw.get("layers_pattern"), "layers_pattern", str)
    for pattern in layers_pattern or ():
        _check_regex(pattern, "layers_pattern")
    base_model = raw.get("base_model_name_or_path")
    return LoraAdapterConfig(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        rank_pattern=tuple((k, int(v)) for k, v in rank_pattern.items()),
        alpha_pattern=tuple((k, float(v)) for k, v in alpha_pattern.items()),
        layers_to_transform=None if layers is None else frozenset(layers),
        layers_pattern=layers_pattern,
        base_model_name_or_path=base_model if isinstance(base_model, str) else None,
    )


def parse_adapter_config_bytes(data: bytes) -> LoraAdapterConfig:
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise FailedPrecondition(f"adapter_config.json is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise FailedPrecondition("adapter_config.json must hold a JSON object")
    return parse_adapter_config(raw)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
