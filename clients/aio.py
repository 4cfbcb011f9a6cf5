"""The asyncio Python client; same methods as Client, awaitable.

async with AsyncClient("127.0.0.1:50051") as client:
    results = await asyncio.gather(*(client.generate(p, adapter=a) for p, a in jobs))
    async for chunk in client.generate_stream("Hello"):
        print(chunk.text, end="")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
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
from loraserve_client.client import HEALTH_STATES
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


class AsyncClient:
    """Asyncio client of one loraserve server. Keyword options: see ClientOptions."""

    def __init__(self, target: str | None = None, **options: Any) -> None:
        self.options = ClientOptions(**({"target": target} if target else {}), **options)
        opts = self.options
        if opts.secure:
            self._channel = grpc.aio.secure_channel(
                opts.target, opts.credentials(), options=opts.channel_options()
            )
        else:
            self._channel = grpc.aio.insecure_channel(opts.target, options=opts.channel_options())
        self._inference = pb2_grpc.InferenceStub(self._channel)
        self._admin = pb2_grpc.AdapterAdminStub(self._channel)
        self._training = pb2_grpc.TrainingStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _unary(
        self, method: Callable, request: Any, timeout: float | None, adapter: str | None = None
    ) -> Any:
        # Retries on UNAVAILABLE happen inside gRPC (the channel's retry policy, ClientOptions).
        try:
            return await method(
                request, timeout=timeout or self.options.timeout, metadata=self.options.call_metadata(adapter)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def _stream(
        self,
        method: Callable,
        request: Any,
        timeout: float | None,
        adapter: str | None,
        convert: Callable[[Any], Any] = StreamChunk.from_pb,
        default_timeout: bool = True,
    ) -> AsyncIterator[Any]:
        # gRPC retries a stream that fails with UNAVAILABLE before its first message, never after.
        if default_timeout:
            timeout = timeout or self.options.timeout
        call = method(request, timeout=timeout, metadata=self.options.call_metadata(adapter))
        try:
            async for message in call:
                yield convert(message)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def generate(
        self, prompt: str, adapter: str = "", *, timeout: float | None = None, **kwargs: Any
    ) -> Generation:
        request = generate_request(prompt, adapter, **sampling_kwargs(**kwargs))
        return Generation.from_pb(await self._unary(self._inference.Generate, request, timeout, adapter))

    def generate_stream(
        self, prompt: str, adapter: str = "", *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[StreamChunk]:
        request = generate_request(prompt, adapter, **sampling_kwargs(**kwargs))
        return self._stream(self._inference.GenerateStream, request, timeout, adapter)

    async def chat(
        self, messages: list[Message], adapter: str = "", *, timeout: float | None = None, **kwargs: Any
    ) -> Generation:
        request = chat_request(messages, adapter, **sampling_kwargs(**kwargs))
        return Generation.from_pb(await self._unary(self._inference.Chat, request, timeout, adapter))

    def chat_stream(
        self, messages: list[Message], adapter: str = "", *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[StreamChunk]:
        request = chat_request(messages, adapter, **sampling_kwargs(**kwargs))
        return self._stream(self._inference.ChatStream, request, timeout, adapter)

    async def tokenize(self, prompt: str | None = None, messages: list[Message] | None = None) -> Tokens:
        response = await self._unary(self._inference.Tokenize, tokenize_request(prompt, messages), None)
        return Tokens(list(response.token_ids), list(response.tokens))

    async def model_info(self) -> ModelInfo:
        return ModelInfo.from_pb(await self._unary(self._inference.ModelInfo, pb2.ModelInfoRequest(), None))

    async def load_adapter(
        self, adapter_id: str, pin: bool = False, *, timeout: float | None = None
    ) -> LoadResult:
        response = await self._unary(
            self._admin.LoadAdapter, pb2.LoadAdapterRequest(adapter_id=adapter_id, pin=pin), timeout
        )
        return LoadResult(AdapterInfo.from_pb(response.adapter), response.reloaded, response.load_seconds)

    async def unload_adapter(self, adapter_id: str) -> AdapterInfo:
        response = await self._unary(
            self._admin.UnloadAdapter, pb2.UnloadAdapterRequest(adapter_id=adapter_id), None
        )
        return AdapterInfo.from_pb(response.adapter)

    async def list_adapters(self, include_disk: bool = False) -> list[AdapterInfo]:
        response = await self._unary(
            self._admin.ListAdapters, pb2.ListAdaptersRequest(include_disk=include_disk), None
        )
        return [AdapterInfo.from_pb(a) for a in response.adapters]

    async def create_training_job(
        self,
        adapter_id: str,
        training_data: bytes | str | Path,
        *,
        timeout: float | None = None,
        **options: Unpack[TrainingJobOptions],
    ) -> TrainingJob:
        """As Client.create_training_job (never retried). A path's file is read here, blocking."""
        request = training_job_request(adapter_id, training_data, **options)
        return TrainingJob.from_pb(await self._unary(self._training.CreateTrainingJob, request, timeout))

    async def get_training_job(self, job_id: str) -> TrainingJob:
        request = pb2.GetTrainingJobRequest(job_id=job_id)
        return TrainingJob.from_pb(await self._unary(self._training.GetTrainingJob, request, None))

    async def list_training_jobs(self) -> list[TrainingJob]:
        response = await self._unary(self._training.ListTrainingJobs, pb2.ListTrainingJobsRequest(), None)
        return [TrainingJob.from_pb(job) for job in response.jobs]

    async def cancel_training_job(self, job_id: str) -> TrainingJob:
        request = pb2.CancelTrainingJobRequest(job_id=job_id)
        return TrainingJob.from_pb(await self._unary(self._training.CancelTrainingJob, request, None))

    def watch_training_job(self, job_id: str, *, timeout: float | None = None) -> AsyncIterator[TrainingJob]:
        """As Client.watch_training_job: no deadline unless `timeout` is given."""
        request = pb2.WatchTrainingJobRequest(job_id=job_id)
        return self._stream(
            self._training.WatchTrainingJob,
            request,
            timeout,
            None,
            convert=TrainingJob.from_pb,
            default_timeout=False,
        )

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        response = await self._unary(
            self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout
        )
        return HEALTH_STATES[response.status]

    async def wait_until_serving(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        state = "unreachable"
        while time.monotonic() < deadline:
            try:
                state = await self.health(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                if state == "SERVING":
                    return
            except Exception as error:  # noqa: BLE001 - not up yet
                state = str(error)
            await asyncio.sleep(interval)
        raise TimeoutError(f"server at {self.options.target} not SERVING after {timeout:g} s ({state})")

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
