"""The HTTP side of the one error boundary: what each route does around the shared guard.

    call = edge.open("/v1/chat/completions")  # request id
    try:
        edge.admit(call, request)                 # phase, API key (Authorization: Bearer), deadline
        body = await edge.body(request, Model)    # size limit, JSON, strict pydantic: 400 naming the field
        ...                                       # adapter ids through Guard.adapter(call, id)
    except ClientGone: ...                        # counted as CANCELLED by the guard
    except Exception as error:
        public = edge.fail(call, error, renames)  # logged and counted by the guard; status + body

Deadlines: HTTP has none of its own, so a client may send `X-Request-Timeout: <seconds>`; past
it the request is ended in the engine and answered 504 (DEADLINE_EXCEEDED), as gRPC does with
its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from loraserve.errors import InvalidArgument
from loraserve.guard import Call, Guard
from loraserve.http_api.errors import DeadlineExceeded, PayloadTooLarge, PublicError, public_error
from loraserve.wiring import Services

TIMEOUT_HEADER = "x-request-timeout"
Model = TypeVar("Model", bound=BaseModel)


class FieldError(InvalidArgument):
    """An invalid field of an HTTP body, with the field's name for OpenAI's `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


class HttpEdge:
    """Admission, bodies, deadlines and errors of HTTP calls, around one guard and one set of services."""

    def __init__(self, guard: Guard, services: Callable[[], Services | None], max_body_bytes: int) -> None:
        self.guard = guard
        self._services = services
        self.max_body_bytes = max_body_bytes

    @property
    def services(self) -> Services:
        services = self._services()
        assert services is not None  # the guard admits calls only once the services exist
        return services

    def open(self, method: str) -> Call:
        return self.guard.open(method)

    def admit(self, call: Call, request: Request, admin: bool = False) -> None:
        """The caller, by its Authorization header, if the server takes calls now; its deadline."""
        call.principal = self.guard.admit(request.headers.items(), admin)
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is not None:
            call.deadline = parse_timeout(raw)
            if call.deadline is None:
                raise FieldError(
                    f"{TIMEOUT_HEADER} header must be a positive number of seconds, got {raw[:40]!r}",
                    TIMEOUT_HEADER,
                )

    async def body(self, request: Request, model: type[Model]) -> Model:
        """The request body as `model`: at most --http-max-body-bytes, JSON, strictly typed."""
        return parse_body(model, await self.read(request))

    async def read(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"request body of {int(length)} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone() from None
        return b"".join(chunks)

    def fail(self, call: Call, error: BaseException, renames: dict[str, str] | None = None) -> PublicError:
        """The public form of a failed call (logged and counted once, by the guard)."""
        return public_error(self.guard.fail(call, error), renames)

    def gone(self, call: Call) -> None:
        self.guard.cancelled(call, deadline_passed=False)

    @contextlib.asynccontextmanager
    async def deadline(self, call: Call) -> AsyncIterator[None]:
        """Ends what runs inside at the call's deadline, as DEADLINE_EXCEEDED."""
        if call.deadline is None:
            yield
            return
        try:
            async with asyncio.timeout(call.deadline - time.monotonic()):
                yield
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request's deadline ({TIMEOUT_HEADER}) passed before it finished"
            ) from None


def parse_timeout(raw: str) -> float | None:
    """The monotonic deadline of an X-Request-Timeout header, or None when it is not a positive number."""
    try:
        seconds = float(raw)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return time.monotonic() + seconds


def parse_body(model: type[Model], raw: bytes) -> Model:
    """Strict parsing; every refusal names the field (`messages[0].role: ...`)."""
    try:
        parsed = model.model_validate_json(raw or b"", strict=True)
    except ValidationError as error:
        raise validation_error(error) from None
    refused = getattr(parsed, "unsupported", lambda: [])()
    if refused:
        field, message = refused[0]
        raise FieldError(message, field)
    return parsed


def validation_error(error: ValidationError) -> FieldError:
    """pydantic's errors as one message naming each wrong field (the first three)."""
    parts: list[str] = []
    first: str | None = None
    for item in error.errors(include_url=False)[:3]:
        kind, where = item["type"], field_path(item["loc"])
        first = first or where or None
        message = item["msg"].removeprefix("Value error, ")
        if kind == "json_invalid":
            parts.append(f"request body is not valid JSON: {item['ctx'].get('error', message)}")
        elif kind in ("model_type", "model_attributes_type") and not where:
            parts.append("request body must be a JSON object")
        elif kind == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif kind == "missing":
            parts.append(f"{where} is required")
        else:
            parts.append(f"{where}: {message}" if where else message)
    return FieldError("; ".join(parts), first)


def field_path(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'role') -> messages[0].role"""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """The result of `work`, or ClientGone once the client closes the connection (`work` is then
    cancelled, which ends its request in the engine)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        for pending in (task, watch):
            pending.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)


async def wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client has gone (the request's body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
