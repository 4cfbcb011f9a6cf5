"""What the sync and asyncio clients share: options, credentials, metadata, request building."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import grpc

from loraserve_client.api import loraserve_pb2 as pb2
from loraserve_client.types import Message, request_fields, to_messages

DEFAULT_TARGET = "127.0.0.1:50051"
# The largest message either side accepts (the server sets the same limit): a training job's data
# travels in one CreateTrainingJob message, so it must fit.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# gRPC clamps a retry policy's maxAttempts (first try included) at 5; no channel option raises it.
MAX_RETRIES = 4
# The services whose every call the retry policy covers: each call either reads or is idempotent
# (loading an adapter twice or unloading it twice ends in the same state).
RETRIED_SERVICES = ("loraserve.v1.Inference", "loraserve.v1.AdapterAdmin", "grpc.health.v1.Health")
# Of the Training service, only the calls that read. CreateTrainingJob is not idempotent (an
# UNAVAILABLE can come after the server queued the job, when the connection drops before the
# answer, and a retry would queue a second job), and a CancelTrainingJob replayed after its first
# attempt did cancel may be answered as a call on a job that has already ended: neither is retried.
RETRIED_METHODS = (
    ("loraserve.v1.Training", "GetTrainingJob"),
    ("loraserve.v1.Training", "ListTrainingJobs"),
    ("loraserve.v1.Training", "WatchTrainingJob"),
)


def retry_service_config(retries: int, backoff: float, max_backoff: float) -> str:
    """The channel's service config: retry on UNAVAILABLE only, with jittered exponential backoff.

    gRPC does the retrying itself (its `retryPolicy`, the same for the sync and asyncio
    channels), which replaces the two hand-written loops this client had: the n-th retry waits
    about min(backoff * 2**(n-1), max_backoff), jittered by gRPC so that clients that failed
    together do not retry together. gRPC also knows what a loop around the call cannot see: a
    call is retried only until it is committed, that is until the server has sent response
    headers or a message, so a stream that has started yielding text is never replayed. The
    calls it does not name (creating and cancelling a training job) have no retry policy.
    """
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": service} for service in RETRIED_SERVICES]
                    + [{"service": service, "method": method} for service, method in RETRIED_METHODS],
                    "retryPolicy": {
                        "maxAttempts": retries + 1,
                        "initialBackoff": f"{max(backoff, 0.001):.3f}s",
                        "maxBackoff": f"{max(max_backoff, backoff, 0.001):.3f}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def _read(value: str | bytes | Path | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


@dataclass
class ClientOptions:
    """Connection options of Client and AsyncClient.

    tls: use TLS (implied by ca_cert or client_cert); ca_cert: PEM of the CA that signed the
    server certificate (system roots when None); client_cert/client_key: PEM pair for mTLS;
    server_name: expected name in the server certificate when it differs from the target host.
    retries: extra attempts on UNAVAILABLE only (0 to 4, gRPC's limit), with jittered exponential
    backoff from `backoff` s up to `max_backoff` s; a stream is retried only before its first
    message. They are gRPC's own retries, set on the channel (see retry_service_config); creating
    and cancelling a training job are never retried (RETRIED_METHODS says why).
    ray_serve: send the adapter id as Ray Serve's multiplexed model id (and the application
    name), so Ray routes each request to a replica that holds its adapter.
    """

    target: str = DEFAULT_TARGET
    api_key: str | None = None
    tls: bool = False
    ca_cert: str | bytes | Path | None = None
    client_cert: str | bytes | Path | None = None
    client_key: str | bytes | Path | None = None
    server_name: str | None = None
    timeout: float | None = 120.0
    retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 5.0
    ray_serve: bool = False
    ray_application: str = "loraserve"
    metadata: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= MAX_RETRIES:
            raise ValueError(
                f"retries must be between 0 and {MAX_RETRIES} (gRPC makes at most 5 attempts per call); "
                f"got {self.retries}"
            )
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff must not be negative")

    @property
    def secure(self) -> bool:
        return self.tls or self.ca_cert is not None or self.client_cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key must be given together (mTLS)")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_cert),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_cert),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        options = list(CHANNEL_OPTIONS)
        if self.retries > 0:
            options.append(("grpc.enable_retries", 1))
            options.append(
                ("grpc.service_config", retry_service_config(self.retries, self.backoff, self.max_backoff))
            )
        else:
            options.append(("grpc.enable_retries", 0))
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def call_metadata(self, adapter: str | None = None) -> list[tuple[str, str]]:
        metadata = list(self.metadata)
        if self.api_key:
            metadata.append(("authorization", f"Bearer {self.api_key}"))
        if self.ray_serve:
            metadata.append(("application", self.ray_application))
            if adapter is not None:
                metadata.append(("multiplexed_model_id", adapter or "__base__"))
        return metadata


def generate_request(prompt: str, adapter: str, **kwargs: Any) -> pb2.GenerateRequest:
    return pb2.GenerateRequest(prompt=prompt, **request_fields(adapter, **kwargs))


def chat_request(messages: list[Message], adapter: str, **kwargs: Any) -> pb2.ChatRequest:
    return pb2.ChatRequest(messages=to_messages(messages), **request_fields(adapter, **kwargs))


def tokenize_request(prompt: str | None, messages: list[Message] | None) -> pb2.TokenizeRequest:
    return pb2.TokenizeRequest(prompt=prompt or "", messages=to_messages(messages or []))


def _training_data(value: str | bytes | Path | None) -> bytes:
    """bytes as they are; a str of JSONL text (it starts with `{`) encoded; a path's file read."""
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and (not value.strip() or value.lstrip().startswith("{")):
        return value.encode()
    return Path(value).expanduser().read_bytes()


class TrainingJobOptions(TypedDict, total=False):
    """The options of `create_training_job` (all keyword-only; unset, 0, "" and None take the
    server's defaults, those of `loraserve train`)."""

    eval_data: str | bytes | Path | None  # JSONL held-out set (default: eval_fraction of the data)
    steps: int  # optimizer steps (default: 3 epochs)
    rank: int
    alpha: float
    learning_rate: float
    batch_size: int
    max_length: int
    target_modules: str  # comma-separated module names, or all-linear
    seed: int | None
    eval_fraction: float | None
    overwrite: bool  # replace an adapter of that id in the store when the job succeeds


def training_job_request(
    adapter_id: str,
    training_data: str | bytes | Path,
    *,
    eval_data: str | bytes | Path | None = None,
    steps: int = 0,
    rank: int = 0,
    alpha: float = 0.0,
    learning_rate: float = 0.0,
    batch_size: int = 0,
    max_length: int = 0,
    target_modules: str = "",
    seed: int | None = None,
    eval_fraction: float | None = None,
    overwrite: bool = False,
) -> pb2.CreateTrainingJobRequest:
    """A CreateTrainingJob request (the keywords: TrainingJobOptions)."""
    options = pb2.TrainingOptions(
        steps=steps,
        rank=rank,
        alpha=alpha,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        target_modules=target_modules,
    )
    if seed is not None:
        options.seed = seed
    if eval_fraction is not None:
        options.eval_fraction = eval_fraction
    request = pb2.CreateTrainingJobRequest(
        adapter_id=adapter_id,
        training_data=_training_data(training_data),
        eval_data=_training_data(eval_data),
        options=options,
        overwrite=overwrite,
    )
    size = request.ByteSize()
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"the training and eval data make a {size / 2**20:.1f} MiB request; "
            f"one request carries at most {MAX_MESSAGE_BYTES / 2**20:.0f} MiB"
        )
    return request


def sampling_kwargs(
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    seed: int | None = None,
    repetition_penalty: float | None = None,
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    max_time_seconds: float = 0.0,
) -> dict[str, Any]:
    """Normalises the generation keyword arguments every generate/chat method takes."""
    return {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
        "repetition_penalty": repetition_penalty,
        "stop": stop,
        "ignore_eos": ignore_eos,
        "max_time_seconds": max_time_seconds,
    }
