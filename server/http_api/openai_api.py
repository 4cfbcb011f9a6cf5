"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, and vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter.

`model` names the adapter (its id in the store), or the base model by its name (the `model` of
ModelInfo) or `__base__`. Each route reads its body into plain values, calls the generation core
or the admin verbs, and writes OpenAI's JSON or server-sent events back; failures become
OpenAI's error shape with the status of docs/api.md's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from loraserve.engine.sequence import FinishReason, SamplingParams
from loraserve.errors import InvalidArgument, NotFound, PermissionDenied
from loraserve.generation import Delta, FinalRecord, GenerationInput
from loraserve.guard import Call, Guard
from loraserve.http_api.edge import ClientGone, HttpEdge, until_disconnected
from loraserve.http_api.errors import PublicError, sse_error
from loraserve.http_api.openai_schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    CompletionRequest,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Sampling,
    TextChoice,
    TextCompletion,
    UnloadLoraAdapterRequest,
    UsageOut,
)
from loraserve.http_api.sse import EventStream, event
from loraserve.ids import BASE
from loraserve.validation import ChatMessage, StoppingSpec, check_messages

# The shared validation names gRPC's fields; OpenAI's clients sent these.
RENAMES = {
    "adapter_id": "model",
    "stopping.max_new_tokens": "max_tokens",
    "stopping.stop_sequences": "stop",
    "prompt_ids": "prompt",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
}
ADMIN_RENAMES = {"adapter_id": "lora_name"}
# OpenAI's default for /v1/completions (chat completions default to the server's own limit).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
FINISH = {
    FinishReason.EOS: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.TIME_LIMIT: "length",  # cut by the server's time limit: truncated, like length
}
# OpenAI's "developer" role is its newer name for "system".
ROLES = {"developer": "system"}


def finish_reason(final: FinalRecord) -> str:
    return FINISH.get(final.finish_reason, "stop")


def usage(final: FinalRecord) -> UsageOut:
    """OpenAI's usage, with the prompt tokens served from the prefix cache (0 from a core without one)."""
    return UsageOut(
        prompt_tokens=final.usage.prompt_tokens,
        completion_tokens=final.usage.completion_tokens,
        total_tokens=final.usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=getattr(final.usage, "cached_prompt_tokens", 0)
        ),
    )


def openai_error(public: PublicError, request_id: str | None) -> JSONResponse:
    return JSONResponse(public.openai_body(), public.status, headers=public.headers(request_id))


def sampling_of(body: Sampling) -> SamplingParams:
    """OpenAI's defaults: temperature 1 and top_p 1 when absent (0 is greedy)."""
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
    )


class OpenAIRoutes:
    """The /v1 routes over one HTTP edge."""

    def __init__(self, edge: HttpEdge) -> None:
        self.edge = edge
        self.created = int(time.time())

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"]),
        ]

    # ------------------------------------------------------------------ boundary
    async def _guarded(
        self, request: Request, method: str, work: Callable[[Call], Any], admin: bool = False, renames=RENAMES
    ) -> Response:
        edge = self.edge
        call = edge.open(method)
        try:
            edge.admit(call, request, admin)
            return await work(call)
        except ClientGone:
            edge.gone(call)
            return Response(status_code=499)  # nobody reads it: the client has gone
        except Exception as error:  # noqa: BLE001 - the error boundary
            return openai_error(edge.fail(call, error, renames), call.request_id)

    def base_model_name(self) -> str:
        return self.edge.services.core.loaded.name

    def adapter_of(self, call: Call, model: str) -> str:
        """The adapter a `model` names ('' for the base model), checked at the edge."""
        return Guard.adapter(call, "" if model in (BASE, self.base_model_name()) else model)

    # ------------------------------------------------------------------ models
    async def _cards(self, call: Call) -> list[ModelCard]:
        """The base model and the store's adapters, as far as the caller may use them."""
        rows = await asyncio.to_thread(self.edge.services.admin.list, True)  # lists the store's folders
        base = self.base_model_name()
        cards = []
        principal = call.principal
        if principal.base_model:
            cards.append(ModelCard(id=base, created=self.created, owned_by="loraserve"))
        for row in rows:
            try:
                principal.check_adapter(row.adapter_id)
            except PermissionDenied:
                continue  # a key sees the adapters it may use
            org = row.adapter_id.split("/")[0] if "/" in row.adapter_id else "loraserve"
            cards.append(
                ModelCard(id=row.adapter_id, created=self.created, owned_by=org, root=base, parent=base)
            )
        return cards

    async def models(self, request: Request) -> Response:
        async def work(call: Call) -> Response:
            cards = await self._cards(call)
            return JSONResponse(ModelList(data=cards).model_dump(), headers={"x-request-id": call.request_id})

        return await self._guarded(request, "/v1/models", work)

    async def model(self, request: Request) -> Response:
        """OpenAI's retrieve-model: one card, or 404."""

        async def work(call: Call) -> Response:
            wanted = request.path_params["model"]
            if wanted == BASE:
                wanted = self.base_model_name()
            for card in await self._cards(call):
                if card.id == wanted:
                    return JSONResponse(card.model_dump(), headers={"x-request-id": call.request_id})
            raise NotFound(f"model {wanted!r} not found (or not allowed to this key)")

        return await self._guarded(request, "/v1/models/{model}", work)

    # ------------------------------------------------------------------ generation
    async def chat(self, request: Request) -> Response:
        async def work(call: Call) -> Response:
            body = await self.edge.body(request, ChatCompletionRequest)
            core = self.edge.services.core
            messages = check_messages(
                [ChatMessage(ROLES.get(m.role, m.role), m.content or "") for m in body.messages], core.limits
            )
            generation = GenerationInput(
                request_id=call.request_id,
                adapter_id=self.adapter_of(call, body.model),
                messages=messages,
                sampling=sampling_of(body),
                stopping=StoppingSpec(
                    max_new_tokens=body.token_limit or 0, stop_sequences=tuple(body.stop or ())
                ),
                tenant=call.principal.tenant,
                deadline=call.deadline,
                method="/v1/chat/completions",
            )
            return await self._answer(request, call, generation, body, chat=True)

        return await self._guarded(request, "/v1/chat/completions", work)

    async def completions(self, request: Request) -> Response:
        async def work(call: Call) -> Response:
            body = await self.edge.body(request, CompletionRequest)
            ids = isinstance(body.prompt, list)
            max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
            generation = GenerationInput(
                request_id=call.request_id,
                adapter_id=self.adapter_of(call, body.model),
                prompt=None if ids else body.prompt,
                prompt_ids=tuple(body.prompt) if ids else None,
                sampling=sampling_of(body),
                stopping=StoppingSpec(max_new_tokens=max_tokens, stop_sequences=tuple(body.stop or ())),
                tenant=call.principal.tenant,
                deadline=call.deadline,
                method="/v1/completions",
            )
            return await self._answer(request, call, generation, body, chat=False)

        return await self._guarded(request, "/v1/completions", work)

    async def _answer(
        self, request: Request, call: Call, generation: GenerationInput, body: Sampling, chat: bool
    ) -> Response:
        core = self.edge.services.core
        ids = f"{'chatcmpl' if chat else 'cmpl'}-{call.request_id}"
        headers = {"x-request-id": call.request_id}
        deltas = core.stream(generation)
        # The first delta (or the failure before it) comes before any byte is sent, so that
        # refusals (unknown adapter, full queue...) keep their HTTP status.
        try:
            first = await until_disconnected(request, self._next(call, deltas))
        except BaseException:
            await deltas.aclose()
            raise
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = ChatChunks if chat else TextChunks
            writer = chunks(ids, int(time.time()), body.model, include_usage)
            return EventStream(self._frames(call, first, deltas, writer), headers)
        async with contextlib.aclosing(deltas):
            text, final = await until_disconnected(request, self._collect(call, first, deltas))
        created, reason = int(time.time()), finish_reason(final)
        if chat:
            message = ChatMessageOut(content=text)
            answer: BaseModel = ChatCompletion(
                id=ids,
                created=created,
                model=body.model,
                choices=[ChatChoice(message=message, finish_reason=reason)],
                usage=usage(final),
            )
        else:
            answer = TextCompletion(
                id=ids,
                created=created,
                model=body.model,
                choices=[TextChoice(text=text, finish_reason=reason)],
                usage=usage(final),
            )
        out = answer.model_dump()
        out["usage"] = usage(final).model_dump(exclude_none=True)
        return JSONResponse(out, headers=headers)

    async def _collect(
        self, call: Call, first: Delta, deltas: AsyncIterator[Delta]
    ) -> tuple[str, FinalRecord]:
        """The whole answer's text and how it ended."""
        texts, delta = [first.text], first
        while delta.final is None:
            delta = await self._next(call, deltas)
            texts.append(delta.text)
        return "".join(texts), delta.final

    async def _next(self, call: Call, deltas: AsyncIterator[Delta]) -> Delta:
        async with self.edge.deadline(call):
            return await anext(deltas)

    async def _frames(
        self, call: Call, first: Delta, deltas: AsyncIterator[Delta], writer: Any
    ) -> AsyncIterator[bytes]:
        """The stream's events: OpenAI's chunks, then usage if asked, then `[DONE]`."""
        try:
            async with contextlib.aclosing(deltas):
                start = writer.start()
                if start is not None:
                    yield event(start)
                delta = first
                while True:
                    if delta.text:
                        yield event(writer.text(delta.text))
                    if delta.final is not None:
                        yield event(writer.finish(delta.final))
                        if writer.include_usage:
                            yield event(writer.usage(delta.final))
                        break
                    delta = await self._next(call, deltas)
            yield event("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):
            self.edge.gone(call)
            raise
        except Exception as error:  # noqa: BLE001 - after the headers, a failure is the last event
            yield sse_error(self.edge.fail(call, error, RENAMES).openai_body())

    # ------------------------------------------------------------------ vLLM's adapter admin
    async def load_lora_adapter(self, request: Request) -> Response:
        async def work(call: Call) -> Response:
            body = await self.edge.body(request, LoadLoraAdapterRequest)
            adapter_id = Guard.admin_adapter(body.lora_name)
            admin = self.edge.services.admin
            if body.lora_path is not None:
                store = admin.adapters.store
                await asyncio.to_thread(
                    check_lora_path, store.root if store else None, adapter_id, body.lora_path
                )
            outcome = await until_disconnected(request, admin.load(adapter_id))
            verb = "reloaded" if outcome.reloaded else "added"
            return PlainTextResponse(
                f"Success: LoRA adapter '{adapter_id}' {verb} successfully.",
                headers={"x-request-id": call.request_id},
            )

        return await self._guarded(request, "/v1/load_lora_adapter", work, admin=True, renames=ADMIN_RENAMES)

    async def unload_lora_adapter(self, request: Request) -> Response:
        async def work(call: Call) -> Response:
            body = await self.edge.body(request, UnloadLoraAdapterRequest)
            adapter_id = Guard.admin_adapter(body.lora_name)
            self.edge.services.admin.unload(adapter_id)
            return PlainTextResponse(
                f"Success: LoRA adapter '{adapter_id}' removed successfully.",
                headers={"x-request-id": call.request_id},
            )

        return await self._guarded(
            request, "/v1/unload_lora_adapter", work, admin=True, renames=ADMIN_RENAMES
        )


def check_lora_path(store_root: Path | None, adapter_id: str, lora_path: str) -> None:
    """vLLM's `lora_path` must be the adapter's own folder in the store (ids are store paths).

    A relative path is read from the store's root. Links are resolved before comparing, so a
    path that leads out of the store is refused whatever its spelling.
    """
    if store_root is None:
        raise InvalidArgument("lora_path: the server has no adapter store (--adapters-dir)")
    path = Path(os.path.expanduser(lora_path))
    if not path.is_absolute():
        path = store_root / path
    resolved = Path(os.path.realpath(path))
    root = Path(os.path.realpath(store_root))
    if not resolved.is_relative_to(root):
        raise InvalidArgument(f"lora_path: {lora_path!r} is outside the adapter store")
    if resolved != root / adapter_id:
        raise InvalidArgument(
            f"lora_path: {lora_path!r} is not the folder of adapter {adapter_id!r} in the store: an "
            "adapter's id is its path in the store, so lora_name must be that path"
        )


class ChatChunks:
    """OpenAI's `chat.completion.chunk` events of one answer."""

    def __init__(self, ids: str, created: int, model: str, include_usage: bool) -> None:
        self.head = {"id": ids, "created": created, "model": model}
        self.include_usage = include_usage

    def _dump(self, chunk: ChatCompletionChunk | TextCompletion) -> dict[str, Any]:
        out = chunk.model_dump()
        for choice in out["choices"]:
            if "delta" in choice:  # a delta carries only what is new
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not self.include_usage:
            out.pop("usage")
        elif out["usage"] is not None:
            out["usage"] = chunk.usage.model_dump(exclude_none=True)
        return out

    def _chunk(self, delta: ChatDelta, reason: str | None) -> dict[str, Any]:
        choice = ChatChunkChoice(delta=delta, finish_reason=reason)
        return self._dump(ChatCompletionChunk(**self.head, choices=[choice]))

    def start(self) -> dict[str, Any] | None:
        return self._chunk(ChatDelta(role="assistant", content=""), None)

    def text(self, text: str) -> dict[str, Any]:
        return self._chunk(ChatDelta(content=text), None)

    def finish(self, final: FinalRecord) -> dict[str, Any]:
        return self._chunk(ChatDelta(), finish_reason(final))

    def usage(self, final: FinalRecord) -> dict[str, Any]:
        return self._dump(ChatCompletionChunk(**self.head, choices=[], usage=usage(final)))


class TextChunks(ChatChunks):
    """OpenAI's `text_completion` events of one streamed completion."""

    def _text(self, text: str, reason: str | None) -> dict[str, Any]:
        return self._dump(TextCompletion(**self.head, choices=[TextChoice(text=text, finish_reason=reason)]))

    def start(self) -> dict[str, Any] | None:
        return None  # a completion's stream starts with its first text

    def text(self, text: str) -> dict[str, Any]:
        return self._text(text, None)

    def finish(self, final: FinalRecord) -> dict[str, Any]:
        return self._text("", finish_reason(final))

    def usage(self, final: FinalRecord) -> dict[str, Any]:
        return self._dump(TextCompletion(**self.head, choices=[], usage=usage(final)))
