"""loraserve's Python client: `Client` (blocking) and `AsyncClient` (asyncio).

Imports only grpcio and protobuf (never torch or transformers), so services that call
loraserve stay light. See README "Python client".

The names below load on first use (PEP 562), so that the server, which imports only the
generated wire stubs in `loraserve_client.api`, never loads the client itself.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AsyncClient": "aio",
    "ClientOptions": "base",
    "Client": "client",
    **dict.fromkeys(
        (
            "AdapterNotFound",
            "AlreadyExists",
            "AdapterRejected",
            "Cancelled",
            "DeadlineExceeded",
            "InvalidRequest",
            "LoraserveError",
            "Overloaded",
            "PermissionDenied",
            "ServerError",
            "Unauthenticated",
            "Unavailable",
        ),
        "errors",
    ),
    **dict.fromkeys(
        (
            "AdapterInfo",
            "Generation",
            "LoadResult",
            "ModelInfo",
            "Sampling",
            "Stopping",
            "StreamChunk",
            "Tokens",
            "TrainingJob",
            "Usage",
        ),
        "types",
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loraserve_client' has no attribute {name!r}")
    return getattr(importlib.import_module(f"loraserve_client.{module}"), name)
