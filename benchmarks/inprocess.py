"""A gRPC server around an engine that is already running, for measuring the gRPC layer's cost."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def serve_engine(engine: Any) -> Iterator[str]:
    """Serves `engine` on a free loopback port in a background thread; yields host:port."""
    from loraserve.app import LoraServer
    from loraserve.config import ServerConfig

    config = ServerConfig(
        model=engine.loaded.name,
        port=0,
        metrics_port=0,
        http_port=0,  # the gRPC benchmark needs no HTTP front end
        warmup=False,
        max_queue_size=10_000,
        max_queue_per_tenant=10_000,
    )
    loop = asyncio.new_event_loop()
    server = LoraServer(config, engine=engine)
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="bench-grpc")
    thread.start()

    async def start() -> int:
        port = await server.start()
        await server.ready.wait()
        return port

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    try:
        yield f"127.0.0.1:{port}"
    finally:

        async def stop() -> None:
            server.guard.phase = "draining"
            await server.server.stop(grace=1.0)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
