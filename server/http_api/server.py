"""The HTTP front end's app and server: Starlette routes under uvicorn, on the server's own loop.

uvicorn runs as a task of the asyncio loop that also runs grpc.aio (`uvicorn.Server.serve` on a
socket bound here), so both front ends share one process, one engine and one guard with no
thread hand-offs: an HTTP handler awaits the generation core exactly as a gRPC handler does.
Signals stay with loraserve.app (uvicorn's own handlers are not installed), which drains both
front ends on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from loraserve.config import ConfigError, ServerConfig, is_loopback
from loraserve.guard import Guard
from loraserve.http_api.edge import HttpEdge
from loraserve.http_api.errors import OPENAI_TYPES
from loraserve.http_api.lorax_api import LoraxRoutes
from loraserve.http_api.openai_api import OpenAIRoutes
from loraserve.wiring import Services

log = logging.getLogger(__name__)
# In-flight requests have finished (or been cut) by the time the server stops: this only bounds
# closing idle keep-alive connections and cut streams.
SHUTDOWN_SECONDS = 2.0
# The playground may fetch only this server: no CDN, no other origin.
PLAYGROUND_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def playground_page() -> bytes:
    return resources.files("loraserve.http_api").joinpath("playground.html").read_bytes()


def build_app(edge: HttpEdge, healthy: Callable[[], bool]) -> Starlette:
    """Every HTTP route: /v1 (OpenAI, vLLM's adapter admin), LoRAX's, /health and the playground."""
    page = playground_page()

    async def health(request: Request) -> Response:
        serving = healthy()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, 200 if serving else 503)

    async def playground(request: Request) -> Response:
        return HTMLResponse(
            page, headers={"content-security-policy": PLAYGROUND_CSP, "cache-control": "no-cache"}
        )

    async def no_route(request: Request, error: Exception) -> Response:
        status = error.status_code if isinstance(error, HTTPException) else 404
        what = "no such path" if status == 404 else "method not allowed on this path"
        body = {
            "error": {
                "message": f"{what}: {request.method} {request.url.path}",
                "type": OPENAI_TYPES.get(status, "invalid_request_error"),
                "param": None,
                "code": "not_found" if status == 404 else "method_not_allowed",
            }
        }
        headers = dict(error.headers or {}) if isinstance(error, HTTPException) else {}
        return JSONResponse(body, status, headers=headers)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/", playground, methods=["GET"]),
        *OpenAIRoutes(edge).routes(),
        *LoraxRoutes(edge).routes(),
    ]
    return Starlette(routes=routes, exception_handlers={404: no_route, 405: no_route})


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: loraserve.app owns SIGTERM/SIGINT for both front ends."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpFrontEnd:
    """The HTTP server of one loraserve process."""

    def __init__(
        self,
        config: ServerConfig,
        guard: Guard,
        services: Callable[[], Services | None],
        healthy: Callable[[], bool],
    ) -> None:
        self.config = config
        self.edge = HttpEdge(guard, services, config.http_max_body_bytes)
        self.app = build_app(self.edge, healthy)
        self.port = 0
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Binds --host:--http-port and serves; returns the port."""
        config = self.config
        sock = bind(config.host, config.http_port)
        self.port = sock.getsockname()[1]
        settings: dict[str, Any] = {}
        if config.tls_cert_file is not None:
            settings = {"ssl_certfile": str(config.tls_cert_file), "ssl_keyfile": str(config.tls_key_file)}
            if config.tls_client_ca_file is not None:
                settings |= {
                    "ssl_ca_certs": str(config.tls_client_ca_file),
                    "ssl_cert_reqs": ssl.CERT_REQUIRED,
                }
        uv_config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,  # the process's logging stays as loraserve.logs set it
            access_log=False,  # every generation has its line in the request log already
            server_header=False,
            timeout_graceful_shutdown=int(SHUTDOWN_SECONDS),
            **settings,
        )
        # uvicorn's own start and stop lines would repeat ours.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._server = _EmbeddedServer(uv_config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-front-end")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            sock.close()
            error = self._task.exception()
            raise ConfigError(f"--http-port: cannot serve HTTP on {config.host}:{self.port}: {error}")
        scheme = "https" if settings else "http"
        where = "loopback only" if is_loopback(config.host) else "reachable from the network"
        log.info(
            "HTTP (OpenAI- and LoRAX-compatible APIs, playground) on %s://%s:%d/ (%s)",
            scheme,
            config.host,
            self.port,
            where,
        )
        return self.port

    async def stop(self) -> None:
        """Stops taking connections, closes idle ones and cuts what is left after a short grace."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await self._task


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port, or a ConfigError naming the flag."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise ConfigError(f"--http-port: cannot bind {host}:{port}: {error.strerror or error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ConfigError(f"--http-port: cannot bind {host}:{port}: {error.strerror or error}") from None
    sock.setblocking(False)
    return sock
