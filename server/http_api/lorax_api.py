"""The LoRAX-compatible API: POST /generate, POST /generate_stream, and POST / (where `lorax-client`
posts, choosing by the body's `stream`: a list of one response, or the event stream).

`inputs` is a raw prompt (as gRPC Generate: no chat template); `parameters.adapter_id` names the
adapter (absent, empty, `__base__` or the base model's name: the base model). Sampling follows
LoRAX: greedy unless `do_sample` or a warper (temperature other than 1, top_k, top_p) is set.
Streams send one event per generated token, the last one with `generated_text` and `details`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loraserve.engine.sequence import FinishReason, SamplingParams
from loraserve.generation import Delta, FinalRecord, GenerationInput
from loraserve.guard import Call, Guard
from loraserve.http_api.edge import ClientGone, HttpEdge, until_disconnected
from loraserve.http_api.errors import PublicError, sse_error
from loraserve.http_api.lorax_schemas import (
    Details,
    GenerateRequest,
    GenerateResponse,
    Parameters,
    StreamDetails,
    StreamResponse,
    Token,
)
from loraserve.http_api.sse import EventStream, event
from loraserve.ids import BASE
from loraserve.validation import StoppingSpec

RENAMES = {
    "adapter_id": "parameters.adapter_id",
    "prompt": "inputs",
    "stopping.max_new_tokens": "parameters.max_new_tokens",
    "stopping.stop_sequences": "parameters.stop",
    "sampling.temperature": "parameters.temperature",
    "sampling.top_p": "parameters.top_p",
}
FINISH = {
    FinishReason.EOS: "eos_token",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
    FinishReason.LENGTH: "length",
    FinishReason.TIME_LIMIT: "length",  # cut by the server's time limit: truncated, like length
}


def sampling_of(parameters: Parameters) -> SamplingParams:
    if not parameters.sampled:
        return SamplingParams(temperature=0.0, repetition_penalty=parameters.repetition_penalty or 1.0)
    return SamplingParams(
        temperature=1.0 if parameters.temperature is None else parameters.temperature,
        top_k=parameters.top_k or 0,
        top_p=1.0 if parameters.top_p is None else parameters.top_p,
        seed=parameters.seed,
        repetition_penalty=parameters.repetition_penalty or 1.0,
    )


class LoraxRoutes:
    """LoRAX's generation routes over one HTTP edge."""

    def __init__(self, edge: HttpEdge) -> None:
        self.edge = edge
        self._special: frozenset[int] | None = None

    def routes(self) -> list[Route]:
        return [
            Route("/generate", self.generate, methods=["POST"]),
            Route("/generate_stream", self.generate_stream, methods=["POST"]),
            Route("/", self.compat, methods=["POST"]),
        ]

    async def generate(self, request: Request) -> Response:
        return await self._serve(request, "/generate", stream=False, as_list=False)

    async def generate_stream(self, request: Request) -> Response:
        return await self._serve(request, "/generate_stream", stream=True, as_list=False)

    async def compat(self, request: Request) -> Response:
        return await self._serve(request, "/", stream=None, as_list=True)

    def error(self, public: PublicError, request_id: str) -> JSONResponse:
        return JSONResponse(public.lorax_body(), public.status, headers=public.headers(request_id))

    async def _serve(self, request: Request, method: str, stream: bool | None, as_list: bool) -> Response:
        edge = self.edge
        call = edge.open(method)
        try:
            edge.admit(call, request)
            body = await edge.body(request, GenerateRequest)
            streaming = body.stream if stream is None else stream
            core = edge.services.core
            parameters = body.parameters
            adapter = parameters.adapter_id or ""
            generation = GenerationInput(
                request_id=call.request_id,
                adapter_id=Guard.adapter(call, "" if adapter in (BASE, core.loaded.name) else adapter),
                prompt=body.inputs,
                sampling=sampling_of(parameters),
                stopping=StoppingSpec(
                    max_new_tokens=parameters.max_new_tokens or 0,
                    stop_sequences=tuple(parameters.stop),
                    ignore_eos=parameters.ignore_eos_token,
                ),
                tenant=call.principal.tenant,
                deadline=call.deadline,
                method=method if method != "/" else "/generate",
            )
            deltas = core.stream(generation)
            try:  # the first token (or the refusal) before any byte is sent
                first = await until_disconnected(request, self._next(call, deltas))
            except BaseException:
                await deltas.aclose()
                raise
            headers = {"x-request-id": call.request_id}
            if streaming:
                return EventStream(self._frames(call, body, first, deltas), headers)
            async with contextlib.aclosing(deltas):
                answer = await until_disconnected(request, self._collect(call, body, first, deltas))
            return JSONResponse([answer] if as_list else answer, headers=headers)
        except ClientGone:
            edge.gone(call)
            return Response(status_code=499)
        except Exception as error:  # noqa: BLE001 - the error boundary
            return self.error(edge.fail(call, error, RENAMES), call.request_id)

    async def _next(self, call: Call, deltas: AsyncIterator[Delta]) -> Delta:
        async with self.edge.deadline(call):
            return await anext(deltas)

    def special(self) -> frozenset[int]:
        if self._special is None:
            self._special = frozenset(self.edge.services.core.tokenizer.all_special_ids)
        return self._special

    def tokens(self, delta: Delta) -> list[Token]:
        """One token per generated id; the delta's text goes with its last token (text held back
        for a possible stop sequence is released with a later token)."""
        special = self.special()
        ids = delta.token_ids
        return [
            Token(id=token, text=delta.text if i == len(ids) - 1 else "", special=token in special)
            for i, token in enumerate(ids)
        ]

    def _seed(self, body: GenerateRequest) -> int | None:
        return body.parameters.seed if body.parameters.sampled else None

    async def _collect(
        self, call: Call, body: GenerateRequest, first: Delta, deltas: AsyncIterator[Delta]
    ) -> dict[str, Any]:
        texts, tokens, delta = [], [], first
        while True:
            texts.append(delta.text)
            tokens.extend(self.tokens(delta))
            if delta.final is not None:
                break
            delta = await self._next(call, deltas)
        final = delta.final
        text = "".join(texts)
        details = None
        if body.parameters.details:
            details = Details(
                finish_reason=FINISH.get(final.finish_reason, "length"),
                prompt_tokens=final.usage.prompt_tokens,
                generated_tokens=final.usage.completion_tokens,
                seed=self._seed(body),
                tokens=tokens,
            )
        full = body.inputs + text if body.parameters.return_full_text else text
        return GenerateResponse(generated_text=full, details=details).model_dump(exclude_none=True)

    def _stream_details(self, body: GenerateRequest, final: FinalRecord) -> StreamDetails | None:
        if not body.parameters.details:
            return None
        return StreamDetails(
            finish_reason=FINISH.get(final.finish_reason, "length"),
            prompt_tokens=final.usage.prompt_tokens,
            generated_tokens=final.usage.completion_tokens,
            seed=self._seed(body),
        )

    async def _frames(
        self, call: Call, body: GenerateRequest, first: Delta, deltas: AsyncIterator[Delta]
    ) -> AsyncIterator[bytes]:
        """One event per token; the last carries the whole text and, if asked, the details."""
        texts: list[str] = []
        try:
            async with contextlib.aclosing(deltas):
                delta = first
                while True:
                    texts.append(delta.text)
                    tokens = self.tokens(delta)
                    if not tokens and delta.final is not None:
                        # Ended without a new token (the time limit): its held-back text still goes out.
                        tokens = [Token(id=-1, text=delta.text, special=False)]
                    for i, token in enumerate(tokens):
                        last = delta.final is not None and i == len(tokens) - 1
                        message = StreamResponse(token=token)
                        if last:
                            text = "".join(texts)
                            message.generated_text = (
                                body.inputs + text if body.parameters.return_full_text else text
                            )
                            message.details = self._stream_details(body, delta.final)
                        yield event(message.model_dump())
                    if delta.final is not None:
                        return
                    delta = await self._next(call, deltas)
        except (asyncio.CancelledError, GeneratorExit):
            self.edge.gone(call)
            raise
        except Exception as error:  # noqa: BLE001 - after the headers, a failure is the last event
            yield sse_error(self.edge.fail(call, error, RENAMES).lorax_body())
