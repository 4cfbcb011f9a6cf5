"""Domain errors, each carrying the gRPC status code it maps to (docs/api.md, "Status codes").

Raised anywhere in the server, the engine or the adapter system; turned into a status in one
place per front end (loraserve.handlers for gRPC). This module imports no grpc so that plain library code
(adapters, engine) can raise them.
"""

from __future__ import annotations


class ServeError(Exception):
    """Base class; `code` is the name of a grpc.StatusCode member."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServeError):
    code = "INVALID_ARGUMENT"


class NotFound(ServeError):
    code = "NOT_FOUND"


class FailedPrecondition(ServeError):
    code = "FAILED_PRECONDITION"


class AlreadyExists(ServeError):
    code = "ALREADY_EXISTS"


class ResourceExhausted(ServeError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServeError):
    code = "UNAVAILABLE"


class Unauthenticated(ServeError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServeError):
    code = "PERMISSION_DENIED"


class InternalError(ServeError):
    code = "INTERNAL"
