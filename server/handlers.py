"""gRPC method handlers built from the proto's service descriptors, with one error boundary.

Every RPC of `Inference` and `AdapterAdmin` goes through `_guard`: it refuses calls while
the server is starting or draining (UNAVAILABLE), authenticates the caller (API keys),
turns undecodable requests (wrong types, invalid UTF-8) into INVALID_ARGUMENT, maps
ServeError subclasses to their status codes, and turns any other exception into INTERNAL
for that call only, logged with its request id. Error counts by code go to the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from loraserve.auth import ANONYMOUS, Principal
from loraserve.errors import InternalError, InvalidArgument, ServeError, Unavailable
from loraserve_client.api import loraserve_pb2 as pb2

log = logging.getLogger(__name__)


@dataclass
class Call:
    """Per-RPC facts handed to the service methods."""

    request_id: str
    method: str
    principal: Principal


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


class Gate:
    """What the guard checks before a call runs; the server updates `phase`."""

    def __init__(self, keyring: Any, metrics: Any) -> None:
        self.phase = "starting"  # starting -> serving -> draining
        self.keyring = keyring
        self.metrics = metrics

    def admit(self, request: Any, context: grpc.aio.ServicerContext, admin: bool) -> Principal:
        if self.phase == "starting":
            raise Unavailable("server is starting: the model is still loading")
        if self.phase == "draining":
            raise Unavailable("server is shutting down and takes no new requests")
        principal = (
            ANONYMOUS if self.keyring is None else self.keyring.authenticate(context.invocation_metadata())
        )
        if admin:
            principal.check_admin()
        if isinstance(request, Undecodable):
            raise InvalidArgument(
                f"request is not a valid {request.type_name}: wrong field types or invalid UTF-8 in a string "
                f"field ({type(request.error).__name__})"
            )
        return principal


def _code_of(error: ServeError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def _count_error(gate: Gate, code: grpc.StatusCode) -> None:
    if gate.metrics is not None:
        gate.metrics.request_errors.labels(code.name).inc()


def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    return (
        grpc.StatusCode.DEADLINE_EXCEEDED
        if remaining is not None and remaining <= 0
        else grpc.StatusCode.CANCELLED
    )


async def _fail(gate: Gate, context: grpc.aio.ServicerContext, call: Call, error: Exception) -> None:
    if not isinstance(error, ServeError) or isinstance(error, InternalError):
        # Details stay in the log; the client gets the request id to quote.
        log.error(
            "request %s (%s) failed: %s",
            call.request_id,
            call.method,
            error,
            exc_info=error if not isinstance(error, ServeError) else None,
        )
        error = InternalError(f"internal error while serving the request (request id {call.request_id})")
    code = _code_of(error)
    _count_error(gate, code)
    log.info(
        "request failed: %s",
        error.message,
        extra={"request_id": call.request_id, "method": call.method, "code": code.name},
    )
    context.set_trailing_metadata((("x-request-id", call.request_id),))
    await context.abort(code, error.message)


def _unary(gate: Gate, method: str, behavior: Callable[[], Callable], admin: bool) -> Callable:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = Call(uuid.uuid4().hex[:16], method, ANONYMOUS)
        try:
            call.principal = gate.admit(request, context, admin)
            return await behavior()(request, context, call)
        except asyncio.CancelledError:
            _count_error(gate, _cancel_code(context))
            raise
        except Exception as error:  # noqa: BLE001 - the error boundary
            await _fail(gate, context, call, error)

    return handler


def _stream(gate: Gate, method: str, behavior: Callable[[], Callable], admin: bool) -> Callable:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = Call(uuid.uuid4().hex[:16], method, ANONYMOUS)
        try:
            call.principal = gate.admit(request, context, admin)
            async for item in behavior()(request, context, call):
                yield item
        except asyncio.CancelledError:
            _count_error(gate, _cancel_code(context))
            raise
        except Exception as error:  # noqa: BLE001 - the error boundary
            await _fail(gate, context, call, error)

    return handler


def service_handler(
    service_name: str, servicer: Callable[[], Any], gate: Gate, admin: bool = False
) -> grpc.GenericRpcHandler:
    """A generic handler for every method of `loraserve.v1.<service_name>`.

    `servicer()` returns the object implementing the methods; it is looked up per call
    because the services exist only once the model is loaded (the gate refuses calls before).
    """
    service = pb2.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb2, method.input_type.name)
        response_class = getattr(pb2, method.output_type.name)

        def behavior(name: str = method.name) -> Callable:
            return getattr(servicer(), name)

        full = f"/{service.full_name}/{method.name}"
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream(gate, full, behavior, admin),
                request_deserializer=safe_deserializer(request_class),
                response_serializer=response_class.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(gate, full, behavior, admin),
                request_deserializer=safe_deserializer(request_class),
                response_serializer=response_class.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
