"""Typed results of client calls (plain dataclasses, no protobuf in user code)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loraserve_client.api import loraserve_pb2 as pb2

FINISH_REASONS = {
    pb2.FINISH_REASON_UNSPECIFIED: None,
    pb2.FINISH_REASON_LENGTH: "length",
    pb2.FINISH_REASON_EOS: "eos",
    pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    pb2.FINISH_REASON_TIME_LIMIT: "time_limit",
}
ADAPTER_STATES = {
    pb2.ADAPTER_STATE_UNSPECIFIED: "unknown",
    pb2.ADAPTER_STATE_DISK: "disk",
    pb2.ADAPTER_STATE_HOST: "host",
    pb2.ADAPTER_STATE_DEVICE: "device",
}
TRAINING_STATES = {
    pb2.TRAINING_STATE_UNSPECIFIED: "unknown",
    pb2.TRAINING_STATE_QUEUED: "queued",
    pb2.TRAINING_STATE_RUNNING: "running",
    pb2.TRAINING_STATE_SUCCEEDED: "succeeded",
    pb2.TRAINING_STATE_FAILED: "failed",
    pb2.TRAINING_STATE_CANCELLED: "cancelled",
}
# The states a job never leaves.
TRAINING_DONE_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, served from the server's prefix cache

    @classmethod
    def from_pb(cls, usage: pb2.Usage) -> Usage:
        return cls(
            usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cached_prompt_tokens
        )


@dataclass(frozen=True)
class Generation:
    """A whole completion."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    request_id: str

    @classmethod
    def from_pb(cls, response: pb2.GenerateResponse) -> Generation:
        return cls(
            response.text,
            list(response.token_ids),
            FINISH_REASONS.get(response.finish_reason),
            Usage.from_pb(response.usage),
            response.request_id,
        )


@dataclass(frozen=True)
class StreamChunk:
    """A streamed text delta; the last chunk of a stream carries finish_reason and usage."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    request_id: str = ""

    @classmethod
    def from_pb(cls, message: pb2.GenerateStreamResponse) -> StreamChunk:
        reason = FINISH_REASONS.get(message.finish_reason)
        return cls(
            message.text,
            list(message.token_ids),
            reason,
            Usage.from_pb(message.usage) if reason is not None else None,
            message.request_id,
        )


@dataclass(frozen=True)
class Tokens:
    token_ids: list[int]
    tokens: list[str]


@dataclass(frozen=True)
class ModelInfo:
    model: str
    architecture: str
    quantization: str
    compute_dtype: str
    device: str
    max_context_length: int
    vocab_size: int
    max_lora_rank: int
    max_loaded_adapters: int
    lora_target_modules: list[str]
    server_version: str
    model_bytes: int

    @classmethod
    def from_pb(cls, m: pb2.ModelInfoResponse) -> ModelInfo:
        return cls(
            m.model,
            m.architecture,
            m.quantization,
            m.compute_dtype,
            m.device,
            m.max_context_length,
            m.vocab_size,
            m.max_lora_rank,
            m.max_loaded_adapters,
            list(m.lora_target_modules),
            m.server_version,
            m.model_bytes,
        )


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    state: str
    rank: int
    target_modules: list[str]
    bytes: int
    in_flight_requests: int
    pinned: bool
    draining: bool
    last_used_unix_seconds: float
    slot: int

    @classmethod
    def from_pb(cls, a: pb2.AdapterInfo) -> AdapterInfo:
        return cls(
            a.adapter_id,
            ADAPTER_STATES.get(a.state, "unknown"),
            a.rank,
            list(a.target_modules),
            a.bytes,
            a.in_flight_requests,
            a.pinned,
            a.draining,
            a.last_used_unix_seconds,
            a.slot,
        )


@dataclass(frozen=True)
class LoadResult:
    adapter: AdapterInfo
    reloaded: bool
    load_seconds: float


@dataclass(frozen=True)
class TrainingJob:
    """One training job. state: queued, running, succeeded, failed or cancelled ("unknown" if the
    server sent none). loss: mean training loss of the last steps (0 before the first step).
    eval_exact_match: held-out exact match in 0..1, None until evaluated. The times are Unix
    seconds; started and finished are 0 until the job starts and ends."""

    job_id: str
    adapter_id: str
    state: str
    step: int
    total_steps: int
    loss: float
    eval_exact_match: float | None
    error: str
    created_unix_seconds: float
    started_unix_seconds: float
    finished_unix_seconds: float
    tenant: str
    eval_examples: int
    train_examples: int

    @property
    def done(self) -> bool:
        """True once the job has ended (succeeded, failed or cancelled): it changes no more."""
        return self.state in TRAINING_DONE_STATES

    @classmethod
    def from_pb(cls, job: pb2.TrainingJob) -> TrainingJob:
        return cls(
            job.job_id,
            job.adapter_id,
            TRAINING_STATES.get(job.state, "unknown"),
            job.step,
            job.total_steps,
            job.loss,
            job.eval_exact_match if job.HasField("eval_exact_match") else None,
            job.error,
            job.created_unix_seconds,
            job.started_unix_seconds,
            job.finished_unix_seconds,
            job.tenant,
            job.eval_examples,
            job.train_examples,
        )


@dataclass
class Sampling:
    """Sampling parameters; the defaults are greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None

    def to_pb(self) -> pb2.SamplingParams:
        message = pb2.SamplingParams(temperature=self.temperature, top_k=self.top_k)
        if self.top_p is not None:
            message.top_p = self.top_p
        if self.seed is not None:
            message.seed = self.seed
        if self.repetition_penalty is not None:
            message.repetition_penalty = self.repetition_penalty
        return message


@dataclass
class Stopping:
    max_new_tokens: int = 0
    stop_sequences: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    max_time_seconds: float = 0.0

    def to_pb(self) -> pb2.StoppingCriteria:
        return pb2.StoppingCriteria(
            max_new_tokens=self.max_new_tokens,
            stop_sequences=self.stop_sequences,
            ignore_eos=self.ignore_eos,
            max_time_seconds=self.max_time_seconds,
        )


Message = Mapping[str, str] | tuple[str, str]


def to_messages(messages: Iterable[Message]) -> list[pb2.ChatMessage]:
    """Accepts {"role", "content"} dicts or (role, content) pairs."""
    out = []
    for message in messages:
        if isinstance(message, Mapping):
            out.append(pb2.ChatMessage(role=message["role"], content=message["content"]))
        else:
            role, content = message
            out.append(pb2.ChatMessage(role=role, content=content))
    return out


def request_fields(
    adapter: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float | None,
    seed: int | None,
    repetition_penalty: float | None,
    stop: list[str] | None,
    ignore_eos: bool,
    max_time_seconds: float,
) -> dict[str, Any]:
    """Keyword arguments shared by GenerateRequest and ChatRequest."""
    return {
        "adapter_id": adapter,
        "sampling": Sampling(temperature, top_k, top_p, seed, repetition_penalty).to_pb(),
        "stopping": Stopping(max_new_tokens, list(stop or []), ignore_eos, max_time_seconds).to_pb(),
    }
