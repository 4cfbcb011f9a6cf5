"""The core is transport-free and the server loads only the client's wire stubs.

Checked in a fresh interpreter, since the test process itself has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

CORE = ["loraserve.generation", "loraserve.guard", "loraserve.admin", "loraserve.wiring", "loraserve.chat"]
SERVERS = ["loraserve.app", "loraserve.ray_app", "loraserve.service", "loraserve.handlers"]


def loaded_after(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return set(json.loads(run.stdout.strip().splitlines()[-1]))


def test_the_generation_core_imports_no_transport() -> None:
    loaded = loaded_after(CORE)
    transport = {m for m in loaded if m.split(".")[0] in ("grpc", "google", "loraserve_client", "ray")}
    assert not transport, sorted(transport)


def test_the_server_imports_only_the_clients_wire_stubs() -> None:
    loaded = loaded_after(SERVERS)
    client = {m for m in loaded if m.split(".")[0] == "loraserve_client"}
    stubs = {"loraserve_client.api.loraserve_pb2", "loraserve_client.api.loraserve_pb2_grpc"}
    assert client <= {"loraserve_client", "loraserve_client.api", *stubs}, sorted(client)
    assert "ray" not in loaded  # Ray is imported only when serve-ray runs
