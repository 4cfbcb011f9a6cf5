"""A training job's request, checked at once: options in range, data parsed and tokenized.

Everything wrong with a request is refused here, before the job is queued, with
INVALID_ARGUMENT naming the field (and for data the line): bad JSONL, an empty set, examples
with no completion token within `max_length`, out-of-range options, data over the server's
size limit. Defaults are `loraserve train`'s (its TrainConfig), so both paths train alike.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from loraserve.adapters.trainable import ALL_LINEAR, select_modules
from loraserve.adapters.training import (
    IGNORE,
    DataError,
    Example,
    TrainConfig,
    encode,
    eval_prompt,
    parse_jsonl,
    split,
)
from loraserve.errors import InvalidArgument

DEFAULTS = TrainConfig(model="", data=None, adapters_dir=None, adapter_id="")  # type: ignore[arg-type]
MAX_STEPS = 100_000
MAX_BATCH_SIZE = 512
MAX_ALPHA = 4096.0
MAX_EVAL_EXAMPLES = 64  # held-out examples evaluated (the first ones of the held-out set)


@dataclass(frozen=True)
class JobRequest:
    """What a client asks for, as plain values (0 / empty / None: the default)."""

    adapter_id: str
    training_data: bytes
    eval_data: bytes = b""
    steps: int = 0
    rank: int = 0
    alpha: float = 0.0
    learning_rate: float = 0.0
    batch_size: int = 0
    max_length: int = 0
    target_modules: str = ""
    seed: int | None = None
    eval_fraction: float | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class JobOptions:
    """Resolved options of a job."""

    steps: int
    rank: int
    alpha: float
    learning_rate: float
    batch_size: int
    max_length: int
    target_modules: str
    seed: int
    eval_fraction: float


@dataclass
class TrainingSpec:
    """A checked job: its options, modules and tokenized data."""

    adapter_id: str
    tenant: str
    options: JobOptions
    modules: list[str]  # adapted module names it trains
    train: list[tuple[list[int], list[int]]]  # (input ids, labels) per training example
    evals: list[tuple[list[int], str]] = field(default_factory=list)  # (prompt ids, expected answer)
    overwrite: bool = False
    data_sha256: str = ""

    @property
    def tokens_per_epoch(self) -> int:
        return sum(len(ids) for ids, _ in self.train)


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"{name}: not UTF-8 text (byte {error.start})") from None


def _examples(data: bytes, name: str) -> list[Example]:
    try:
        return parse_jsonl(_text(data, name), name)
    except DataError as error:
        raise InvalidArgument(str(error)) from None


def _tokenized(function: Any, tokenizer: Any, example: Example, source: str) -> Any:
    """`function(tokenizer, example)`, its failures (a chat template refusing the turns, text the
    tokenizer cannot take such as lone surrogates) refused naming the line."""
    try:
        return function(tokenizer, example)
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise InvalidArgument(
            f"{source}:{example.line}: cannot be tokenized ({type(error).__name__}: {str(error)[:200]})"
        ) from None


def _encoded(tokenizer: Any, example: Example, max_length: int, source: str) -> tuple[list[int], list[int]]:
    return _tokenized(lambda t, e: encode(t, e, max_length), tokenizer, example, source)


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(f"options.{name} must be in [{low:g}, {high:g}], got {value:g}")


def resolve_options(request: JobRequest, max_rank: int, max_context: int) -> JobOptions:
    """Defaults filled in and every option checked against its range. `max_context`: the
    longest example the server takes (the model's context, and at most one training slice)."""
    rank = request.rank or DEFAULTS.rank
    alpha = request.alpha or DEFAULTS.alpha
    learning_rate = request.learning_rate or DEFAULTS.lr
    batch_size = request.batch_size or DEFAULTS.batch_size
    max_length = request.max_length or min(DEFAULTS.max_length, max_context)
    eval_fraction = DEFAULTS.eval_fraction if request.eval_fraction is None else request.eval_fraction
    _in_range("steps", request.steps, 0, MAX_STEPS)
    _in_range("rank", rank, 1, max_rank)
    _in_range("alpha", alpha, 1e-3, MAX_ALPHA)
    _in_range("learning_rate", learning_rate, 1e-7, 1.0)
    _in_range("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    _in_range("max_length", max_length, 2, max_context)
    _in_range("eval_fraction", eval_fraction, 0.0, 0.5)
    return JobOptions(
        steps=request.steps,
        rank=rank,
        alpha=float(alpha),
        learning_rate=float(learning_rate),
        batch_size=batch_size,
        max_length=max_length,
        target_modules=request.target_modules.strip() or ALL_LINEAR,
        seed=DEFAULTS.seed if request.seed is None else int(request.seed),
        eval_fraction=float(eval_fraction),
    )


def prepare(
    request: JobRequest,
    tenant: str,
    tokenizer: Any,
    adapted: list[str],
    max_rank: int,
    max_context: int,
    max_data_bytes: int,
) -> TrainingSpec:
    """The checked, tokenized job (CPU work: call it off the event loop). `max_context`: the
    longest example, the model's context or one training slice's tokens, whichever is less."""
    size = len(request.training_data) + len(request.eval_data)
    if size > max_data_bytes:
        raise InvalidArgument(
            f"training_data + eval_data: {size} bytes, over the server's limit of {max_data_bytes} "
            "(--training-max-data-bytes)"
        )
    if not request.training_data.strip():
        raise InvalidArgument("training_data is empty: give one JSON object per line")
    options = resolve_options(request, max_rank, max_context)
    modules = select_modules(adapted, options.target_modules)
    examples = _examples(request.training_data, "training_data")
    if request.eval_data.strip():
        train_set, eval_set = examples, _examples(request.eval_data, "eval_data")
    else:
        train_set, eval_set = split(examples, options.eval_fraction, options.seed)
    if len(eval_set) > MAX_EVAL_EXAMPLES:  # each costs up to 48 uncached forward passes
        if not request.eval_data.strip():  # a held-out split: the rest of it trains
            train_set = train_set + eval_set[MAX_EVAL_EXAMPLES:]
        eval_set = eval_set[:MAX_EVAL_EXAMPLES]
    source = "eval_data" if request.eval_data.strip() else "training_data"
    encoded = [_encoded(tokenizer, e, options.max_length, "training_data") for e in train_set]
    encoded = [pair for pair in encoded if any(label != IGNORE for label in pair[1])]
    if not encoded:
        raise InvalidArgument(
            f"training_data: no training example has completion tokens within options.max_length "
            f"{options.max_length}"
        )
    if not options.steps:  # `loraserve train`'s default: a number of epochs
        batch = min(options.batch_size, len(encoded))
        steps = max(1, math.ceil(DEFAULTS.epochs * len(encoded) / batch))
        options = JobOptions(**{**options.__dict__, "steps": min(steps, MAX_STEPS)})
    evals = []
    for example in eval_set:
        ids, expected = _tokenized(eval_prompt, tokenizer, example, source)
        if not ids:
            raise InvalidArgument(f"{source}:{example.line}: the prompt is empty, nothing to evaluate from")
        evals.append((ids[-options.max_length :], expected))
    digest = hashlib.sha256(request.training_data + b"\0" + request.eval_data).hexdigest()
    return TrainingSpec(
        adapter_id=request.adapter_id,
        tenant=tenant,
        options=options,
        modules=modules,
        train=encoded,
        evals=evals,
        overwrite=request.overwrite,
        data_sha256=digest,
    )
