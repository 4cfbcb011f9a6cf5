"""The HTTP front end: OpenAI- and LoRAX-compatible APIs and a playground page.

A thin adapter over the same generation core, admin verbs and guard as gRPC (loraserve.wiring,
loraserve.guard), served by uvicorn on the server's own asyncio loop: one engine, one set of
limits, one auth, one metrics registry and one request log for both front ends.

- loraserve.http_api.server: the Starlette app and the embedded uvicorn server.
- loraserve.http_api.edge: the HTTP side of the error boundary (bodies, keys, deadlines, errors).
- loraserve.http_api.openai_api / lorax_api: the routes, over pydantic bodies in *_schemas.
- loraserve.http_api.sse: server-sent events that end the request when the client goes away.
"""

from loraserve.http_api.server import HttpFrontEnd

__all__ = ["HttpFrontEnd"]
