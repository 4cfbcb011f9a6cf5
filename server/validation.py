"""Turns API messages into engine requests, checking every field against the configured limits.

Each refusal is an InvalidArgument whose message starts with the field's name and states
the limit, e.g. `sampling.top_p must be in (0, 1], got 1.5`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loraserve.engine.sequence import (
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    SamplingParams,
    StoppingCriteria,
)
from loraserve.errors import FailedPrecondition, InvalidArgument
from loraserve.ids import validate_adapter_id

CHAT_ROLES = ("system", "user", "assistant")


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


def check_stopping(stopping: Any, present: bool, prompt_tokens: int, limits: Limits) -> StoppingCriteria:
    room = limits.max_context_length - prompt_tokens
    max_new = stopping.max_new_tokens if present else 0
    stops: tuple[str, ...] = ()
    max_time = 0.0
    ignore_eos = False
    if present:
        if len(stopping.stop_sequences) > limits.max_stop_sequences:
            raise InvalidArgument(
                f"stopping.stop_sequences has {len(stopping.stop_sequences)} entries; the limit is "
                f"{limits.max_stop_sequences}"
            )
        for i, stop in enumerate(stopping.stop_sequences):
            if not stop:
                raise InvalidArgument(f"stopping.stop_sequences[{i}] is empty")
            if len(stop) > limits.max_stop_sequence_chars:
                raise InvalidArgument(
                    f"stopping.stop_sequences[{i}] has {len(stop)} characters; the limit is "
                    f"{limits.max_stop_sequence_chars}"
                )
        stops = tuple(stopping.stop_sequences)
        max_time = stopping.max_time_seconds
        if not math.isfinite(max_time) or max_time < 0 or max_time > limits.max_request_seconds:
            raise InvalidArgument(
                f"stopping.max_time_seconds must be in [0, {limits.max_request_seconds:g}] "
                f"(0: server default), got {max_time}"
            )
        ignore_eos = stopping.ignore_eos
    if max_new == 0:
        max_new = max(1, min(limits.default_max_new_tokens, room))
    elif prompt_tokens + max_new > limits.max_context_length:
        raise InvalidArgument(
            f"stopping.max_new_tokens={max_new} plus the prompt's {prompt_tokens} tokens exceeds the model's "
            f"context of {limits.max_context_length} tokens"
        )
    return StoppingCriteria(
        max_new_tokens=max_new,
        stop_sequences=stops,
        ignore_eos=ignore_eos,
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


def check_messages(messages: Any, limits: Limits) -> list[dict[str, str]]:
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
        checked.append({"role": message.role, "content": message.content})
    if sum(len(m["content"]) for m in checked) > limits.max_prompt_chars:
        raise InvalidArgument(f"messages hold more than {limits.max_prompt_chars} characters in all")
    return checked


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation with the generation prompt for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition("the model's tokenizer has no chat template; use Generate with a raw prompt")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as error:  # noqa: BLE001 - templates raise their own errors (e.g. role order)
        raise InvalidArgument(f"messages: the chat template refused them: {error}") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
