"""loraserve's Python client: `Client` (blocking) and `AsyncClient` (asyncio).

Imports only grpcio and protobuf (never torch or transformers), so services that call
loraserve stay light. See README "Python client".
"""

from clients.aio import AsyncClient
from clients.base import ClientOptions
from clients.client import Client
from clients.errors import (
    AdapterNotFound,
    AdapterRejected,
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    LoraserveError,
    Overloaded,
    PermissionDenied,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from clients.types import (
    AdapterInfo,
    Generation,
    LoadResult,
    ModelInfo,
    Sampling,
    Stopping,
    StreamChunk,
    Tokens,
    Usage,
)

__all__ = [
    "AdapterInfo",
    "AdapterNotFound",
    "AdapterRejected",
    "AsyncClient",
    "Cancelled",
    "Client",
    "ClientOptions",
    "DeadlineExceeded",
    "Generation",
    "InvalidRequest",
    "LoadResult",
    "LoraserveError",
    "ModelInfo",
    "Overloaded",
    "PermissionDenied",
    "Sampling",
    "ServerError",
    "Stopping",
    "StreamChunk",
    "Tokens",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
