"""The generation core: plain values in, an async stream of outputs and one final record out.

Transport-independent (no protobuf, no gRPC): a front end reads its wire format into a
`GenerationInput` (fields checked by loraserve.validation, the adapter id and the caller by
loraserve.guard), then either iterates `stream()` — `Delta`s of new text, the last one carrying
the `FinalRecord` (finish reason, usage, timings) — or awaits `complete()`. The core tokenizes,
checks the token limits, submits to the engine, aborts the engine's sequence when the consumer
stops early (client cancelled, deadline), and records each finished request once: metrics and
the one-line request log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from loraserve.chat import render_chat
from loraserve.engine.sequence import FinishReason, GenerationRequest, SamplingParams, SequenceOutput
from loraserve.errors import InvalidArgument, ServeError
from loraserve.logs import log_request
from loraserve.validation import (
    ChatMessage,
    Limits,
    StoppingSpec,
    check_prompt_ids,
    check_prompt_text,
    check_prompt_tokens,
    check_stopping,
)

# Prompts longer than this are tokenized off the event loop.
INLINE_TOKENIZE_CHARS = 8192
# The caller's deadline cancels the call (and the request, at the engine's next step); the
# engine's own time limit is only a backstop a little later, so that the client sees its
# deadline pass rather than a race with a TIME_LIMIT answer.
DEADLINE_GRACE_SECONDS = 1.0


@dataclass(frozen=True)
class GenerationInput:
    """One generation request in plain values. Exactly one of `prompt`, `prompt_ids` and
    `messages` is set; `adapter_id` ('' for the base model) and `tenant` come from the guard."""

    request_id: str
    adapter_id: str = ""
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingSpec = field(default_factory=StoppingSpec)
    tenant: str = ""
    deadline: float | None = None  # time.monotonic() seconds
    method: str = "Generate"  # names the call in the request log
    arrival: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Seconds from arrival: to first being scheduled, to the first token, to the end."""

    queue_seconds: float
    time_to_first_token_seconds: float | None
    total_seconds: float


@dataclass(frozen=True)
class FinalRecord:
    """How a request ended."""

    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    preemptions: int = 0


@dataclass(frozen=True)
class Delta:
    """New text and tokens since the previous delta; `final` is set on the last one."""

    text: str
    token_ids: list[int]
    final: FinalRecord | None = None


@dataclass(frozen=True)
class Completion:
    """A whole generation."""

    text: str
    token_ids: list[int]
    final: FinalRecord


@dataclass(frozen=True)
class ModelDescription:
    """What a client may want to know about the served model and the adapter slots."""

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


class GenerationCore:
    """Generation on one engine, for any front end."""

    def __init__(
        self, loaded: Any, engine: Any, limits: Limits, metrics: Any, log_prompts: bool = False
    ) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self.log_prompts = log_prompts
        # Adapters that are announced but not written yet (the demo's, while they train): an
        # object whose check(adapter_id) raises Unavailable for them. None: no such adapters.
        self.availability: Any = None

    # ------------------------------------------------------------------ tokens
    async def encode(self, text: str) -> list[int]:
        """Token ids of a raw prompt (with the tokenizer's own BOS handling)."""
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self.tokenizer(text)["input_ids"]
        return await asyncio.to_thread(lambda: self.tokenizer(text)["input_ids"])

    async def render(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of a conversation, user text never read as control tokens."""
        return await asyncio.to_thread(render_chat, self.tokenizer, messages)

    async def tokenize(self, prompt: str | None = None, messages: Sequence[ChatMessage] = ()) -> list[int]:
        """What `Tokenize` answers: the ids the engine would see (no token limit applied)."""
        if messages:
            return await self.render(messages)
        check_prompt_text(prompt or "", self.limits)
        return await self.encode(prompt or "")

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    async def _prompt(self, request: GenerationInput) -> tuple[list[int], str]:
        """The prompt's ids, within the token limits, and its text for the request log."""
        if request.messages:
            ids = await self.render(request.messages)
            check_prompt_tokens(ids, self.limits, "messages")
            return ids, request.messages[-1].content
        if request.prompt_ids is not None:
            return check_prompt_ids(request.prompt_ids, len(self.tokenizer), self.limits), ""
        check_prompt_text(request.prompt or "", self.limits)
        ids = await self.encode(request.prompt or "")
        check_prompt_tokens(ids, self.limits)
        return ids, request.prompt or ""

    async def _engine_request(self, request: GenerationInput) -> tuple[GenerationRequest, str]:
        if sum((request.prompt is not None, request.prompt_ids is not None, bool(request.messages))) != 1:
            raise InvalidArgument("give exactly one of prompt, prompt_ids and messages")
        if self.availability is not None and request.adapter_id:
            self.availability.check(request.adapter_id)
        prompt_ids, prompt_text = await self._prompt(request)
        stopping = check_stopping(request.stopping, len(prompt_ids), self.limits)
        if request.deadline is not None:
            # The engine counts max_time_seconds from the arrival (GenerationRequest.arrival), not
            # from now: tokenizing may already have taken a while.
            allowed = max(request.deadline - request.arrival, 0.0) + DEADLINE_GRACE_SECONDS
            if allowed < stopping.max_time_seconds:
                stopping = replace(stopping, max_time_seconds=allowed)
        generation = GenerationRequest(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            sampling=request.sampling,
            stopping=stopping,
            adapter_id=request.adapter_id,
            tenant=request.tenant,
            arrival=request.arrival,
        )
        return generation, prompt_text

    # ------------------------------------------------------------------ generation
    async def stream(self, request: GenerationInput) -> AsyncIterator[Delta]:
        """The request's outputs as they come; the last delta carries the final record.

        Leaving the iteration early (the consumer was cancelled) aborts the request in the engine,
        which returns its KV blocks and adapter pin at its next step.
        """
        generation, prompt_text = await self._engine_request(request)
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
                final = None
                if output.done:
                    done = True
                    final = final_record(output)
                    self._record(request, generation, final, label, prompt_text, "".join(texts))
                yield Delta(output.text, list(output.token_ids), final)
                if final is not None:
                    return
        finally:
            if not done:
                self.engine.abort(seq)

    async def complete(self, request: GenerationInput) -> Completion:
        """The whole generation at once."""
        texts: list[str] = []
        token_ids: list[int] = []
        final: FinalRecord | None = None
        async for delta in self.stream(request):
            texts.append(delta.text)
            token_ids.extend(delta.token_ids)
            final = delta.final
        assert final is not None  # stream() ends only after the final delta, or raises
        return Completion("".join(texts), token_ids, final)

    def _record(
        self,
        request: GenerationInput,
        generation: GenerationRequest,
        final: FinalRecord,
        label: str,
        prompt_text: str,
        output_text: str,
    ) -> None:
        """Metrics and the request log line of a finished request (the only place for both)."""
        m = self.metrics
        reason = final.finish_reason.value
        timings = final.timings
        m.requests.labels(reason, label).inc()
        m.prompt_tokens.labels(label).inc(final.usage.prompt_tokens)
        m.generation_tokens.labels(label).inc(final.usage.completion_tokens)
        m.request_duration.observe(timings.total_seconds)
        m.request_queue_time.observe(timings.queue_seconds)
        ttft = timings.time_to_first_token_seconds
        if ttft is not None:
            m.time_to_first_token.observe(ttft)
        log_request(
            {
                "request_id": request.request_id,
                "method": request.method,
                "tenant": generation.tenant or "-",
                "adapter": generation.adapter_id or "-",
                "prompt_tokens": final.usage.prompt_tokens,
                "output_tokens": final.usage.completion_tokens,
                "queue_ms": round(timings.queue_seconds * 1e3, 1),
                "ttft_ms": None if ttft is None else round(ttft * 1e3, 1),
                "total_ms": round(timings.total_seconds * 1e3, 1),
                "finish_reason": reason,
                "preemptions": final.preemptions,
            },
            prompt=prompt_text,
            output=output_text,
            log_prompts=self.log_prompts,
        )

    # ------------------------------------------------------------------ model
    def describe_model(self) -> ModelDescription:
        from loraserve import __version__

        loaded, slots = self.loaded, self.engine.slots
        return ModelDescription(
            model=loaded.name,
            architecture=loaded.architecture,
            quantization=loaded.quantization,
            compute_dtype=loaded.dtype_name,
            device=str(loaded.device),
            max_context_length=loaded.max_context_length,
            vocab_size=len(self.tokenizer),
            max_lora_rank=slots.max_rank,
            max_loaded_adapters=slots.num_slots,
            lora_target_modules=list(slots.target_leaves),
            server_version=__version__,
            model_bytes=loaded.model_bytes,
        )


def final_record(out: SequenceOutput) -> FinalRecord:
    """The final record of the engine's last output of a request."""
    finished = out.finished if out.finished is not None else time.monotonic()
    return FinalRecord(
        finish_reason=out.finish_reason,
        usage=Usage(out.prompt_tokens, out.completion_tokens, out.cached_prompt_tokens),
        timings=Timings(
            queue_seconds=(out.first_scheduled or finished) - out.arrival,
            time_to_first_token_seconds=None if out.first_token is None else out.first_token - out.arrival,
            total_seconds=finished - out.arrival,
        ),
        preemptions=out.preemptions,
    )
