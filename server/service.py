"""The gRPC services: `Inference` (generate, chat, tokenize, model info) and `AdapterAdmin`.

Methods validate their request into plain values (server.validation), hand generation to the
engine, and stream its outputs back. They raise ServeError subclasses; server.handlers maps
them to status codes. A client that cancels, or whose deadline passes, is dropped from the
engine's batch at its next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc

from loraserve.engine.engine import Engine
from loraserve.engine.sequence import FinishReason, GenerationRequest, SequenceOutput
from loraserve.errors import InvalidArgument, ResourceExhausted, ServeError
from loraserve.handlers import Call
from loraserve.logs import log_request
from loraserve.model_loader import LoadedModel
from loraserve.validation import (
    Limits,
    check_adapter_id,
    check_messages,
    check_prompt_text,
    check_prompt_tokens,
    check_sampling,
    check_stopping,
    render_chat,
)
from loraserve_client.api import loraserve_pb2 as pb2

FINISH_REASONS = {
    FinishReason.LENGTH: pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb2.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.TIME_LIMIT: pb2.FINISH_REASON_TIME_LIMIT,
}
ADAPTER_STATES = {
    "disk": pb2.ADAPTER_STATE_DISK,
    "host": pb2.ADAPTER_STATE_HOST,
    "device": pb2.ADAPTER_STATE_DEVICE,
}
# Prompts longer than this are tokenized off the event loop.
INLINE_TOKENIZE_CHARS = 8192
ADMIN_LOAD_TIMEOUT_SECONDS = 120.0
DEADLINE_GRACE_SECONDS = 1.0


def usage(out: SequenceOutput) -> pb2.Usage:
    return pb2.Usage(
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        total_tokens=out.prompt_tokens + out.completion_tokens,
    )


class InferenceService:
    def __init__(
        self, loaded: LoadedModel, engine: Engine, limits: Limits, metrics: Any, config: Any
    ) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self.config = config

    # ------------------------------------------------------------------ request preparation
    async def _encode(self, text: str) -> list[int]:
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self.tokenizer(text)["input_ids"]
        return await asyncio.to_thread(lambda: self.tokenizer(text)["input_ids"])

    async def _prompt_ids(self, request: Any) -> tuple[list[int], str]:
        if isinstance(request, pb2.ChatRequest):
            messages = check_messages(request.messages, self.limits)
            ids = await asyncio.to_thread(render_chat, self.tokenizer, messages)
            check_prompt_tokens(ids, self.limits, "messages")
            return ids, messages[-1]["content"]
        check_prompt_text(request.prompt, self.limits)
        ids = await self._encode(request.prompt)
        check_prompt_tokens(ids, self.limits)
        return ids, request.prompt

    async def _generation(
        self, request: Any, context: grpc.aio.ServicerContext, call: Call
    ) -> tuple[GenerationRequest, str]:
        arrival = time.monotonic()
        adapter_id = check_adapter_id(request.adapter_id)
        call.principal.check_adapter(adapter_id)
        sampling = check_sampling(request.sampling, request.HasField("sampling"))
        prompt_ids, prompt_text = await self._prompt_ids(request)
        stopping = check_stopping(
            request.stopping, request.HasField("stopping"), len(prompt_ids), self.limits
        )
        # The client's deadline cancels the call (and the request, at the engine's next step);
        # the engine's own time limit is only a backstop a little later, so that the client sees
        # DEADLINE_EXCEEDED rather than a race with a TIME_LIMIT answer.
        remaining = context.time_remaining()
        if remaining is not None and remaining + DEADLINE_GRACE_SECONDS < stopping.max_time_seconds:
            stopping = replace(stopping, max_time_seconds=max(remaining, 0.0) + DEADLINE_GRACE_SECONDS)
        generation = GenerationRequest(
            request_id=call.request_id,
            prompt_ids=prompt_ids,
            sampling=sampling,
            stopping=stopping,
            adapter_id=adapter_id,
            tenant=call.principal.tenant,
            arrival=arrival,
        )
        return generation, prompt_text

    # ------------------------------------------------------------------ generation
    async def _run(
        self, generation: GenerationRequest, prompt_text: str, call: Call
    ) -> AsyncIterator[SequenceOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SequenceOutput] = asyncio.Queue()

        def sink(output: SequenceOutput) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, output)

        seq = self.engine.submit(generation, sink)
        label = self.metrics.adapter_labels.observe(generation.adapter_id)
        self.metrics.adapter_requests.labels(label).inc()
        done = False
        texts: list[str] = []
        try:
            while True:
                output = await queue.get()
                if output.error is not None:
                    done = True
                    raise output.error if isinstance(output.error, ServeError) else RuntimeError(output.error)
                texts.append(output.text)
                if output.done:
                    done = True
                    self._record(generation, output, label, call, prompt_text, "".join(texts))
                yield output
                if output.done:
                    return
        finally:
            if not done:
                self.engine.abort(seq)

    def _record(
        self,
        generation: GenerationRequest,
        out: SequenceOutput,
        label: str,
        call: Call,
        prompt_text: str,
        output_text: str,
    ) -> None:
        m = self.metrics
        reason = out.finish_reason.value
        m.requests.labels(reason, label).inc()
        m.prompt_tokens.labels(label).inc(out.prompt_tokens)
        m.generation_tokens.labels(label).inc(out.completion_tokens)
        m.request_duration.observe(out.finished - out.arrival)
        queue_time = (out.first_scheduled or out.finished) - out.arrival
        m.request_queue_time.observe(queue_time)
        ttft = None if out.first_token is None else out.first_token - out.arrival
        if ttft is not None:
            m.time_to_first_token.observe(ttft)
        log_request(
            {
                "request_id": call.request_id,
                "method": call.method.rsplit("/", 1)[-1],
                "tenant": generation.tenant or "-",
                "adapter": generation.adapter_id or "-",
                "prompt_tokens": out.prompt_tokens,
                "output_tokens": out.completion_tokens,
                "queue_ms": round(queue_time * 1e3, 1),
                "ttft_ms": None if ttft is None else round(ttft * 1e3, 1),
                "total_ms": round((out.finished - out.arrival) * 1e3, 1),
                "finish_reason": reason,
                "preemptions": out.preemptions,
            },
            prompt=prompt_text,
            output=output_text,
            log_prompts=self.config.log_prompts,
        )

    async def _complete(
        self, request: Any, context: grpc.aio.ServicerContext, call: Call
    ) -> pb2.GenerateResponse:
        generation, prompt_text = await self._generation(request, context, call)
        texts: list[str] = []
        token_ids: list[int] = []
        last: SequenceOutput | None = None
        async for output in self._run(generation, prompt_text, call):
            texts.append(output.text)
            token_ids.extend(output.token_ids)
            last = output
        return pb2.GenerateResponse(
            text="".join(texts),
            token_ids=token_ids,
            finish_reason=FINISH_REASONS[last.finish_reason],
            usage=usage(last),
            request_id=call.request_id,
        )

    async def _stream(
        self, request: Any, context: grpc.aio.ServicerContext, call: Call
    ) -> AsyncIterator[Any]:
        generation, prompt_text = await self._generation(request, context, call)
        async for output in self._run(generation, prompt_text, call):
            message = pb2.GenerateStreamResponse(
                text=output.text, token_ids=output.token_ids, request_id=call.request_id
            )
            if output.done:
                message.finish_reason = FINISH_REASONS[output.finish_reason]
                message.usage.CopyFrom(usage(output))
            yield message

    async def Generate(self, request: pb2.GenerateRequest, context: Any, call: Call) -> pb2.GenerateResponse:
        return await self._complete(request, context, call)

    async def Chat(self, request: pb2.ChatRequest, context: Any, call: Call) -> pb2.GenerateResponse:
        return await self._complete(request, context, call)

    async def GenerateStream(
        self, request: pb2.GenerateRequest, context: Any, call: Call
    ) -> AsyncIterator[Any]:
        async for message in self._stream(request, context, call):
            yield message

    async def ChatStream(self, request: pb2.ChatRequest, context: Any, call: Call) -> AsyncIterator[Any]:
        async for message in self._stream(request, context, call):
            yield message

    # ------------------------------------------------------------------ other
    async def Tokenize(self, request: pb2.TokenizeRequest, context: Any, call: Call) -> pb2.TokenizeResponse:
        if len(request.messages):
            ids = await asyncio.to_thread(
                render_chat, self.tokenizer, check_messages(request.messages, self.limits)
            )
        else:
            check_prompt_text(request.prompt, self.limits)
            ids = await self._encode(request.prompt)
        return pb2.TokenizeResponse(token_ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids))

    async def ModelInfo(
        self, request: pb2.ModelInfoRequest, context: Any, call: Call
    ) -> pb2.ModelInfoResponse:
        from loraserve import __version__

        loaded = self.loaded
        return pb2.ModelInfoResponse(
            model=loaded.name,
            architecture=loaded.architecture,
            quantization=loaded.quantization,
            compute_dtype=loaded.dtype_name,
            device=str(loaded.device),
            max_context_length=loaded.max_context_length,
            vocab_size=len(self.tokenizer),
            max_lora_rank=self.engine.slots.max_rank,
            max_loaded_adapters=self.engine.slots.num_slots,
            lora_target_modules=self.engine.slots.target_leaves,
            server_version=__version__,
            model_bytes=loaded.model_bytes,
        )


def adapter_info(row: dict) -> pb2.AdapterInfo:
    return pb2.AdapterInfo(
        adapter_id=row["adapter_id"],
        state=ADAPTER_STATES[row["tier"]],
        rank=row["rank"],
        target_modules=row["targets"],
        bytes=row["bytes"],
        in_flight_requests=row["in_flight"],
        pinned=row["pinned"],
        draining=row["draining"],
        last_used_unix_seconds=row["last_used"],
        slot=row["slot"],
    )


class AdapterAdminService:
    def __init__(self, engine: Engine) -> None:
        self.adapters = engine.adapters

    def _info(self, adapter_id: str) -> pb2.AdapterInfo:
        return adapter_info(self.adapters.describe_one(adapter_id))

    async def LoadAdapter(
        self, request: pb2.LoadAdapterRequest, context: Any, call: Call
    ) -> pb2.LoadAdapterResponse:
        if not request.adapter_id:
            raise InvalidArgument("adapter_id is empty")
        adapter_id = check_adapter_id(request.adapter_id)
        started = time.perf_counter()
        future, reloaded = self.adapters.load(adapter_id, request.pin)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), ADMIN_LOAD_TIMEOUT_SECONDS)
        except TimeoutError:
            raise ResourceExhausted(
                f"adapter {adapter_id!r} is in host memory but no device slot became free within "
                f"{ADMIN_LOAD_TIMEOUT_SECONDS:g} s (all slots busy or pinned)"
            ) from None
        return pb2.LoadAdapterResponse(
            adapter=self._info(adapter_id),
            reloaded=reloaded,
            load_seconds=time.perf_counter() - started,
        )

    async def UnloadAdapter(self, request: pb2.UnloadAdapterRequest, context: Any, call: Call) -> Any:
        if not request.adapter_id:
            raise InvalidArgument("adapter_id is empty")
        entry = self.adapters.unload(check_adapter_id(request.adapter_id))
        return pb2.UnloadAdapterResponse(adapter=self._info(entry.adapter_id))

    async def ListAdapters(self, request: pb2.ListAdaptersRequest, context: Any, call: Call) -> Any:
        rows = self.adapters.describe(include_disk=request.include_disk)
        return pb2.ListAdaptersResponse(adapters=[adapter_info(row) for row in rows])
