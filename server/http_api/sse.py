"""Server-sent events that end their request in the engine when the client goes away.

`EventStream` is an ASGI response: it sends the frames of an async iterator while watching the
connection, and on a disconnect (or a failed write, or the server cutting the call) it stops
the iterator and closes it, whose own `finally` ends the request in the engine, so its KV
blocks and adapter pin are returned at the next step rather than when the generation would
have finished.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from loraserve.http_api.edge import wait_disconnect

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies that buffer responses would hold the stream back
]


def event(data: Any) -> bytes:
    """One `data:` event; `data` is JSON-encoded unless it is already text."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class EventStream:
    """An ASGI response streaming `frames` as text/event-stream."""

    def __init__(self, frames: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        self.frames = frames
        self.headers = HEADERS + [(k.encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
            # Closing a generator left at a `yield` (the client went away while a frame was
            # being written) runs its cleanup now, not whenever it is collected.
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _pump(self, send: Any) -> None:
        async for frame in self.frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
