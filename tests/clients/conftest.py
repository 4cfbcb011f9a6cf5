"""Fixtures of the client tests."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import pytest


@pytest.fixture
def grpc_server():
    """`start(add_servicer, servicer)` serves a scripted servicer on a free loopback port and
    returns its target; every server started is stopped after the test. For the client's
    behaviour under failures a real server cannot be made to give on demand."""
    servers = []

    def start(add_servicer: Callable[[Any, grpc.Server], None], servicer: Any) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add_servicer(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)
