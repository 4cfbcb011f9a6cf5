"""The synchronous Python client.

from loraserve_client import Client
with Client("127.0.0.1:50051") as client:
    print(client.generate("Translate: bom dia", adapter="pt-en").text)
    for chunk in client.generate_stream("Hello", max_new_tokens=32):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve_client.api import loraserve_pb2 as pb2
from loraserve_client.api import loraserve_pb2_grpc as pb2_grpc
from loraserve_client.base import (
    ClientOptions,
    TrainingJobOptions,
    chat_request,
    generate_request,
    sampling_kwargs,
    tokenize_request,
    training_job_request,
)
from loraserve_client.errors import from_rpc_error
from loraserve_client.types import (
    AdapterInfo,
    Generation,
    LoadResult,
    Message,
    ModelInfo,
    StreamChunk,
    Tokens,
    TrainingJob,
)

HEALTH_STATES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


class Client:
    """Blocking client of one loraserve server. Keyword options: see ClientOptions."""

    def __init__(self, target: str | None = None, **options: Any) -> None:
        self.options = ClientOptions(**({"target": target} if target else {}), **options)
        opts = self.options
        if opts.secure:
            self._channel = grpc.secure_channel(
                opts.target, opts.credentials(), options=opts.channel_options()
            )
        else:
            self._channel = grpc.insecure_channel(opts.target, options=opts.channel_options())
        self._inference = pb2_grpc.InferenceStub(self._channel)
        self._admin = pb2_grpc.AdapterAdminStub(self._channel)
        self._training = pb2_grpc.TrainingStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ------------------------------------------------------------------ plumbing
    def _unary(
        self, method: Callable, request: Any, timeout: float | None, adapter: str | None = None
    ) -> Any:
        # Retries on UNAVAILABLE happen inside gRPC (the channel's retry policy, ClientOptions).
        try:
            return method(
                request, timeout=timeout or self.options.timeout, metadata=self.options.call_metadata(adapter)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def _stream(
        self,
        method: Callable,
        request: Any,
        timeout: float | None,
        adapter: str | None,
        convert: Callable[[Any], Any] = StreamChunk.from_pb,
        default_timeout: bool = True,
    ) -> Iterator[Any]:
        # gRPC retries a stream that fails with UNAVAILABLE before its first message, never after.
        if default_timeout:
            timeout = timeout or self.options.timeout
        call = method(request, timeout=timeout, metadata=self.options.call_metadata(adapter))
        try:
            for message in call:
                yield convert(message)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # no-op when finished; stops the server's work when the caller breaks out

    # ------------------------------------------------------------------ inference
    def generate(
        self, prompt: str, adapter: str = "", *, timeout: float | None = None, **kwargs: Any
    ) -> Generation:
        """Completes `prompt` with the adapter ('' = base model). kwargs: max_new_tokens, temperature,
        top_k, top_p, seed, repetition_penalty, stop, ignore_eos, max_time_seconds."""
        request = generate_request(prompt, adapter, **sampling_kwargs(**kwargs))
        return Generation.from_pb(self._unary(self._inference.Generate, request, timeout, adapter))

    def generate_stream(
        self, prompt: str, adapter: str = "", *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[StreamChunk]:
        """Yields text deltas as they are generated; the last chunk has finish_reason and usage."""
        request = generate_request(prompt, adapter, **sampling_kwargs(**kwargs))
        return self._stream(self._inference.GenerateStream, request, timeout, adapter)

    def chat(
        self, messages: list[Message], adapter: str = "", *, timeout: float | None = None, **kwargs: Any
    ) -> Generation:
        """The assistant's next turn; messages are {"role", "content"} dicts or (role, content) pairs."""
        request = chat_request(messages, adapter, **sampling_kwargs(**kwargs))
        return Generation.from_pb(self._unary(self._inference.Chat, request, timeout, adapter))

    def chat_stream(
        self, messages: list[Message], adapter: str = "", *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[StreamChunk]:
        request = chat_request(messages, adapter, **sampling_kwargs(**kwargs))
        return self._stream(self._inference.ChatStream, request, timeout, adapter)

    def tokenize(self, prompt: str | None = None, messages: list[Message] | None = None) -> Tokens:
        response = self._unary(self._inference.Tokenize, tokenize_request(prompt, messages), None)
        return Tokens(list(response.token_ids), list(response.tokens))

    def model_info(self) -> ModelInfo:
        return ModelInfo.from_pb(self._unary(self._inference.ModelInfo, pb2.ModelInfoRequest(), None))

    # ------------------------------------------------------------------ admin
    def load_adapter(self, adapter_id: str, pin: bool = False, *, timeout: float | None = None) -> LoadResult:
        response = self._unary(
            self._admin.LoadAdapter, pb2.LoadAdapterRequest(adapter_id=adapter_id, pin=pin), timeout
        )
        return LoadResult(AdapterInfo.from_pb(response.adapter), response.reloaded, response.load_seconds)

    def unload_adapter(self, adapter_id: str) -> AdapterInfo:
        response = self._unary(
            self._admin.UnloadAdapter, pb2.UnloadAdapterRequest(adapter_id=adapter_id), None
        )
        return AdapterInfo.from_pb(response.adapter)

    def list_adapters(self, include_disk: bool = False) -> list[AdapterInfo]:
        response = self._unary(
            self._admin.ListAdapters, pb2.ListAdaptersRequest(include_disk=include_disk), None
        )
        return [AdapterInfo.from_pb(a) for a in response.adapters]

    # ------------------------------------------------------------------ training
    def create_training_job(
        self,
        adapter_id: str,
        training_data: bytes | str | Path,
        *,
        timeout: float | None = None,
        **options: Unpack[TrainingJobOptions],
    ) -> TrainingJob:
        """Queues the training of a new adapter `adapter_id` on the server's base model.

        training_data and eval_data are JSONL ({"prompt", "completion"} or {"messages": [...]} per
        line): bytes, a str of JSONL text (it starts with `{`), or a path (a Path, or any other
        str) to read. The options left at 0, "" or None take the server's defaults. overwrite:
        replace an adapter of that id in the store when the job succeeds. The server checks the
        data and options at once (InvalidRequest). Never retried: an UNAVAILABLE may come after
        the job was queued (see base.RETRIED_METHODS). Raises ValueError when the request would be
        larger than gRPC's 16 MiB message limit.
        """
        request = training_job_request(adapter_id, training_data, **options)
        return TrainingJob.from_pb(self._unary(self._training.CreateTrainingJob, request, timeout))

    def get_training_job(self, job_id: str) -> TrainingJob:
        request = pb2.GetTrainingJobRequest(job_id=job_id)
        return TrainingJob.from_pb(self._unary(self._training.GetTrainingJob, request, None))

    def list_training_jobs(self) -> list[TrainingJob]:
        """The jobs this caller may see, newest first."""
        response = self._unary(self._training.ListTrainingJobs, pb2.ListTrainingJobsRequest(), None)
        return [TrainingJob.from_pb(job) for job in response.jobs]

    def cancel_training_job(self, job_id: str) -> TrainingJob:
        """Cancels a queued or running job (nothing of it is written); never retried."""
        request = pb2.CancelTrainingJobRequest(job_id=job_id)
        return TrainingJob.from_pb(self._unary(self._training.CancelTrainingJob, request, None))

    def watch_training_job(self, job_id: str, *, timeout: float | None = None) -> Iterator[TrainingJob]:
        """Yields the job now, then the job at each change, until it ends (the last one is `done`).

        timeout bounds the whole watch in seconds; None (the default) waits as long as the job
        runs, whatever ClientOptions.timeout says. Leaving the loop stops the watch, not the job.
        """
        request = pb2.WatchTrainingJobRequest(job_id=job_id)
        return self._stream(
            self._training.WatchTrainingJob,
            request,
            timeout,
            None,
            convert=TrainingJob.from_pb,
            default_timeout=False,
        )

    # ------------------------------------------------------------------ health
    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """SERVING, NOT_SERVING, ... of the server (or one of its services)."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return HEALTH_STATES[response.status]

    def wait_until_serving(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        """Polls health until SERVING; raises TimeoutError with the last state otherwise."""
        deadline = time.monotonic() + timeout
        state = "unreachable"
        while time.monotonic() < deadline:
            try:
                state = self.health(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                if state == "SERVING":
                    return
            except Exception as error:  # noqa: BLE001 - not up yet
                state = str(error)
            time.sleep(interval)
        raise TimeoutError(f"server at {self.options.target} not SERVING after {timeout:g} s ({state})")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
