"""Fixtures of the HTTP front end's tests: one server with both front ends on the toy model."""

from __future__ import annotations

import threading

import pytest

from tests.helpers import ServerThread, free_port


@pytest.fixture(scope="session")
def http_server(toy) -> ServerThread:
    """gRPC and HTTP on one engine (2 device slots: the toy's 6 adapters rotate)."""
    srv = ServerThread(
        model=str(toy.base),
        adapters_dir=toy.store,
        max_loaded_adapters=2,
        kv_cache_bytes=4 << 20,
        http_port=free_port(),
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def base_url(http_server: ServerThread) -> str:
    return f"http://127.0.0.1:{http_server.server.http.port}"


class HeldEngine:
    """Holds the engine's next forward pass until released: requests stay in flight meanwhile.

    The hold gives way by itself after 300 s (a test that failed before releasing it); tests
    release it in a `finally`."""

    def __init__(self, srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.gate = threading.Event(), threading.Event()
        real = srv.engine.runner.execute

        def held(batch):
            self.entered.set()
            self.gate.wait(300)
            return real(batch)

        monkeypatch.setattr(srv.engine.runner, "execute", held)

    def release(self) -> None:
        self.gate.set()
