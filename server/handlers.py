"""gRPC method handlers built from the proto's service descriptors, around the shared guard.

Every RPC of `Inference`, `AdapterAdmin` and `Training` runs inside `_unary` or `_stream`: the guard
(loraserve.guard) admits the call (phase, API key, admin right) and turns failures into public
errors; this module does only the gRPC side: request ids in trailing metadata, deadlines from
the context, undecodable requests (wrong types, invalid UTF-8) as INVALID_ARGUMENT, and status
codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from loraserve.errors import InvalidArgument, ServeError
from loraserve.guard import Call, Guard
from loraserve_client.api import loraserve_pb2 as pb2

REQUEST_ID_HEADER = "x-request-id"


class Undecodable:
    """Stands in for a request whose bytes did not parse as the expected message."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name = type_name
        self.error = error


def safe_deserializer(message_class: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as error:  # noqa: BLE001 - protobuf raises DecodeError and friends
            return Undecodable(message_class.DESCRIPTOR.full_name, error)

    return deserialize


def check_decoded(request: Any) -> None:
    """Refuses a request that did not parse (checked after admission, like any field)."""
    if isinstance(request, Undecodable):
        raise InvalidArgument(
            f"request is not a valid {request.type_name}: wrong field types or invalid UTF-8 in a string "
            f"field ({type(request.error).__name__})"
        )


def status_code(error: ServeError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def deadline_of(context: Any) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _deadline_passed(call: Call) -> bool:
    return call.deadline is not None and time.monotonic() >= call.deadline


def _open(guard: Guard, method: str, context: grpc.aio.ServicerContext) -> Call:
    """A new call with its request id (also in the trailing metadata) and the client's deadline."""
    call = guard.open(method, deadline_of(context))
    context.set_trailing_metadata(((REQUEST_ID_HEADER, call.request_id),))
    return call


def _admit(guard: Guard, call: Call, request: Any, context: grpc.aio.ServicerContext, admin: bool) -> None:
    call.principal = guard.admit(context.invocation_metadata(), admin)
    check_decoded(request)


async def _abort(guard: Guard, context: grpc.aio.ServicerContext, call: Call, error: Exception) -> None:
    public = guard.fail(call, error)
    await context.abort(status_code(public), public.message)


def _unary(guard: Guard, method: str, behavior: Callable[[], Callable], admin: bool) -> Callable:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _open(guard, method, context)
        try:
            _admit(guard, call, request, context, admin)
            return await behavior()(request, call)
        except asyncio.CancelledError:
            guard.cancelled(call, _deadline_passed(call))
            raise
        except Exception as error:  # noqa: BLE001 - the error boundary
            await _abort(guard, context, call, error)

    return handler


def _stream(guard: Guard, method: str, behavior: Callable[[], Callable], admin: bool) -> Callable:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _open(guard, method, context)
        try:
            _admit(guard, call, request, context, admin)
            async for item in behavior()(request, call):
                yield item
        except asyncio.CancelledError:
            guard.cancelled(call, _deadline_passed(call))
            raise
        except Exception as error:  # noqa: BLE001 - the error boundary
            await _abort(guard, context, call, error)

    return handler


def service_handler(
    service_name: str, servicer: Callable[[], Any], guard: Guard, admin: bool = False
) -> grpc.GenericRpcHandler:
    """A generic handler for every method of `loraserve.v1.<service_name>`.

    `servicer()` returns the object implementing the methods; it is looked up per call
    because the services exist only once the model is loaded (the guard refuses calls before).
    """
    service = pb2.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb2, method.input_type.name)
        response_class = getattr(pb2, method.output_type.name)

        def behavior(name: str = method.name) -> Callable:
            return getattr(servicer(), name)

        full = f"/{service.full_name}/{method.name}"
        wrap = _stream if method.server_streaming else _unary
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            wrap(guard, full, behavior, admin),
            request_deserializer=safe_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
