"""Checks every field of a request against the configured limits, into plain values.

Front ends read their wire format into the plain values here (`ChatMessage`, `StoppingSpec`);
the checks are the same whatever the transport. Each refusal is an InvalidArgument whose
message starts with the field's name and states the limit, e.g. `sampling.top_p must be in
(0, 1], got 1.5`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraserve.engine.sequence import (
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    SamplingParams,
    StoppingCriteria,
)
from loraserve.errors import InvalidArgument
from loraserve.ids import validate_adapter_id

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str


@dataclass(frozen=True)
class StoppingSpec:
    """Stopping as the client asked, before the prompt's length is known (0: server default)."""

    max_new_tokens: int = 0
    stop_sequences: tuple[str, ...] = ()
    max_time_seconds: float = 0.0
    ignore_eos: bool = False


@dataclass(frozen=True)
class Limits:
    """Request limits, from ServerConfig and the loaded model."""

    max_context_length: int
    max_prompt_tokens: int
    max_prompt_chars: int
    max_messages: int
    max_stop_sequences: int
    max_stop_sequence_chars: int
    default_max_new_tokens: int
    max_request_seconds: float

    @classmethod
    def from_config(cls, config: Any, max_context_length: int) -> Limits:
        return cls(
            max_context_length=max_context_length,
            max_prompt_tokens=min(config.max_prompt_tokens or max_context_length, max_context_length),
            max_prompt_chars=config.max_prompt_chars,
            max_messages=config.max_messages,
            max_stop_sequences=config.max_stop_sequences,
            max_stop_sequence_chars=config.max_stop_sequence_chars,
            default_max_new_tokens=config.default_max_new_tokens,
            max_request_seconds=config.max_request_seconds,
        )


def check_adapter_id(adapter_id: str) -> str:
    """'' is the base model; anything else must be a well-formed store id."""
    if adapter_id == "":
        return ""
    try:
        return validate_adapter_id(adapter_id)
    except InvalidArgument as error:
        raise InvalidArgument(f"adapter_id: {error.message}") from None


def check_sampling(sampling: Any, present: bool) -> SamplingParams:
    """Sampling within the sampler's bounds (a temperature below GREEDY_TEMPERATURE decodes greedily)."""
    if not present:
        return SamplingParams()
    temperature = sampling.temperature
    if not math.isfinite(temperature) or temperature < 0 or temperature > MAX_TEMPERATURE:
        raise InvalidArgument(
            f"sampling.temperature must be finite and in [0, {MAX_TEMPERATURE:g}], got {temperature}"
        )
    top_p = 1.0
    if sampling.HasField("top_p"):
        top_p = sampling.top_p
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {top_p}")
    penalty = 1.0
    if sampling.HasField("repetition_penalty"):
        penalty = sampling.repetition_penalty
        # The wire's float32 rounds 0.01 down to 0.0099999998: the lower bound allows for that.
        if (
            not math.isfinite(penalty)
            or not MIN_REPETITION_PENALTY * (1 - 1e-6) <= penalty <= MAX_REPETITION_PENALTY
        ):
            raise InvalidArgument(
                f"sampling.repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, "
                f"{MAX_REPETITION_PENALTY:g}], got {penalty}"
            )
    seed = sampling.seed if sampling.HasField("seed") else None
    return SamplingParams(
        temperature=float(temperature),
        top_k=int(sampling.top_k),
        top_p=float(top_p),
        seed=seed,
        repetition_penalty=float(penalty),
    )


def check_stopping(spec: StoppingSpec, prompt_tokens: int, limits: Limits) -> StoppingCriteria:
    """The engine's stopping criteria: the request's, within the limits and the context left."""
    if len(spec.stop_sequences) > limits.max_stop_sequences:
        raise InvalidArgument(
            f"stopping.stop_sequences has {len(spec.stop_sequences)} entries; the limit is "
            f"{limits.max_stop_sequences}"
        )
    for i, stop in enumerate(spec.stop_sequences):
        if not stop:
            raise InvalidArgument(f"stopping.stop_sequences[{i}] is empty")
        if len(stop) > limits.max_stop_sequence_chars:
            raise InvalidArgument(
                f"stopping.stop_sequences[{i}] has {len(stop)} characters; the limit is "
                f"{limits.max_stop_sequence_chars}"
            )
    max_time = spec.max_time_seconds
    if not math.isfinite(max_time) or max_time < 0 or max_time > limits.max_request_seconds:
        raise InvalidArgument(
            f"stopping.max_time_seconds must be in [0, {limits.max_request_seconds:g}] "
            f"(0: server default), got {max_time}"
        )
    max_new = spec.max_new_tokens
    if max_new < 0:
        raise InvalidArgument(f"stopping.max_new_tokens must be >= 0 (0: server default), got {max_new}")
    if max_new == 0:
        room = limits.max_context_length - prompt_tokens
        max_new = max(1, min(limits.default_max_new_tokens, room))
    elif prompt_tokens + max_new > limits.max_context_length:
        raise InvalidArgument(
            f"stopping.max_new_tokens={max_new} plus the prompt's {prompt_tokens} tokens exceeds the model's "
            f"context of {limits.max_context_length} tokens"
        )
    return StoppingCriteria(
        max_new_tokens=max_new,
        stop_sequences=tuple(spec.stop_sequences),
        ignore_eos=spec.ignore_eos,
        max_time_seconds=max_time or limits.max_request_seconds,
    )


def check_prompt_text(prompt: str, limits: Limits) -> None:
    if not prompt:
        raise InvalidArgument("prompt is empty")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidArgument(f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}")


def check_prompt_tokens(prompt_ids: list[int], limits: Limits, field: str = "prompt") -> None:
    if not prompt_ids:
        raise InvalidArgument(f"{field} is empty after tokenization")
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise InvalidArgument(
            f"{field} has {len(prompt_ids)} tokens; the limit is {limits.max_prompt_tokens}"
        )
    if len(prompt_ids) >= limits.max_context_length:
        raise InvalidArgument(
            f"{field} has {len(prompt_ids)} tokens, leaving no room to generate in the model's context "
            f"of {limits.max_context_length}"
        )


def check_prompt_ids(prompt_ids: Sequence[int], vocab_size: int, limits: Limits) -> list[int]:
    """A prompt given as token ids: each must be a token of the model's vocabulary."""
    for i, token in enumerate(prompt_ids):
        if not 0 <= token < vocab_size:
            raise InvalidArgument(f"prompt_ids[{i}] = {token} is not a token id (vocabulary of {vocab_size})")
    ids = list(prompt_ids)
    check_prompt_tokens(ids, limits, "prompt_ids")
    return ids


def check_messages(messages: Sequence[Any], limits: Limits) -> tuple[ChatMessage, ...]:
    """Checks a conversation; each message is anything with `role` and `content` strings."""
    if len(messages) == 0:
        raise InvalidArgument("messages is empty")
    if len(messages) > limits.max_messages:
        raise InvalidArgument(f"messages has {len(messages)} entries; the limit is {limits.max_messages}")
    checked = []
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidArgument(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {message.role[:40]!r}"
            )
        if len(message.content) > limits.max_prompt_chars:
            raise InvalidArgument(
                f"messages[{i}].content has {len(message.content)} characters; "
                f"the limit is {limits.max_prompt_chars}"
            )
        checked.append(ChatMessage(message.role, message.content))
    if sum(len(m.content) for m in checked) > limits.max_prompt_chars:
        raise InvalidArgument(f"messages hold more than {limits.max_prompt_chars} characters in all")
    return tuple(checked)
