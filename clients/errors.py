"""Typed client errors, one per gRPC status code the server uses (docs/api.md, "Status codes")."""

from __future__ import annotations

import grpc


class LoraserveError(Exception):
    """Base class: `code` is the gRPC status code name, `details` the server's message."""

    code = "UNKNOWN"

    def __init__(self, details: str, request_id: str | None = None) -> None:
        super().__init__(details)
        self.details = details
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.details}"


class InvalidRequest(LoraserveError):
    code = "INVALID_ARGUMENT"


class AdapterNotFound(LoraserveError):
    code = "NOT_FOUND"


class AdapterRejected(LoraserveError):
    """The adapter exists but does not fit this base (shapes, rank, format)."""

    code = "FAILED_PRECONDITION"


class AlreadyExists(LoraserveError):
    """A training job's adapter id is taken (in the store, or by a job still running)."""

    code = "ALREADY_EXISTS"


class Overloaded(LoraserveError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(LoraserveError):
    code = "UNAVAILABLE"


class Unauthenticated(LoraserveError):
    code = "UNAUTHENTICATED"


class PermissionDenied(LoraserveError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(LoraserveError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(LoraserveError):
    code = "CANCELLED"


class ServerError(LoraserveError):
    code = "INTERNAL"


_BY_CODE = {cls.code: cls for cls in LoraserveError.__subclasses__()}


def from_rpc_error(error: grpc.RpcError) -> LoraserveError:
    """The typed error for a failed call (works for sync and asyncio calls)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    request_id = None
    try:
        for key, value in error.trailing_metadata() or ():
            if key == "x-request-id":
                request_id = value
    except Exception:  # noqa: BLE001 - some errors carry no metadata
        pass
    cls = _BY_CODE.get(code.name if code is not None else "UNKNOWN", ServerError)
    typed = cls(details or (code.name if code is not None else "unknown error"), request_id)
    typed.code = code.name if code is not None else "UNKNOWN"
    return typed
