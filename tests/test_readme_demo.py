"""The README's Quickstart against what `make serve` serves: SmolLM2-135M-Instruct and the demo
adapters trained on it (built by `loraserve demo` once per machine, cached under the user
cache dir). The session's commands run as a reader would type them; outputs not marked
machine-dependent are the README's word for word, and so are the grpcurl answers."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from loraserve.demo.tenants import TENANT_IDS, tenants_build
from loraserve_client import Client
from loraserve_client.api import loraserve_pb2 as pb2
from loraserve_client.api import loraserve_pb2_grpc as pb2_grpc
from tests.helpers import slow_server

ROOT = Path(__file__).resolve().parent.parent
# The first test's fixture trains the demo adapters when this machine has not yet.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(5400)]


@pytest.fixture(scope="module")
def tenants():
    """`loraserve demo` in its own process: trains the missing demo adapters (minutes, once per
    machine) and prints the report."""
    run = subprocess.run(
        [sys.executable, "-m", "loraserve.cli", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    build = tenants_build()
    assert report["adapters_dir"] == str(build.adapters_dir) and build.missing() == []
    return report


@pytest.fixture(scope="module")
def demo_server(tenants):
    # No model configured: what `make serve` serves.
    with slow_server(model=None, kv_cache_bytes=64 << 20) as server:
        yield server


def test_every_adapter_clearly_beats_the_base_model(tenants) -> None:
    """The scores `loraserve demo` measured on held-out sets: each adapter well above the base
    model on the same prompts, and above the base model told the task in the prompt."""
    assert set(tenants["adapters"]) == set(TENANT_IDS)
    for adapter_id, entry in tenants["adapters"].items():
        assert entry["adapter"] >= entry["base"] + 0.3, (adapter_id, entry)
        if entry["base_instructed"] is not None:
            assert entry["adapter"] > entry["base_instructed"], (adapter_id, entry)


def test_base_model_keeps_its_chat_ability(demo_server) -> None:
    with Client(demo_server.target) as client:
        answer = client.chat([("user", "What is the capital of France?")], max_new_tokens=32)
    assert "Paris" in answer.text


def readme_session() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of the README's session against `make serve`."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("While `make serve` runs", 1)[1].split("```console\n", 1)[1].split("```", 1)[0]
    session: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            session.append((line[2:], []))
        else:
            session[-1][1].append(line)
    return session


def test_readme_session_against_the_demo(demo_server) -> None:
    """Runs the README's commands as a reader would, against the demo: each succeeds and prints
    something; outputs not marked machine-dependent are the README's, word for word."""
    session = readme_session()
    assert len(session) >= 6
    env = {**os.environ, "LORASERVE_TARGET": demo_server.target}
    cli = f"{shlex.quote(sys.executable)} -m loraserve.cli"
    for command, expected in session:
        run = subprocess.run(
            command.replace(".venv/bin/loraserve", cli),
            shell=True,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert run.returncode == 0, (command, run.stderr[-2000:])
        output = run.stdout.rstrip("\n").splitlines()
        assert "".join(output).strip(), f"{command}: printed nothing"
        if "machine-dependent" in command:
            continue
        if "adapters list" in command:
            # LAST USED is a clock time: compare the other columns.
            assert [row.split()[:-1] for row in output[1:]] == [row.split()[:-1] for row in expected[1:]]
            assert output[0].split() == expected[0].split()
        else:
            assert output == expected, command


def test_readme_grpc_examples_against_the_demo(demo_server) -> None:
    """The README's grpcurl requests, sent with the same JSON bodies: the answers it shows."""
    readme = (ROOT / "README.md").read_text()
    with grpc.insecure_channel(demo_server.target) as channel:
        inference = pb2_grpc.InferenceStub(channel)
        call = re.search(r"-d '(\{\"adapter_id\": \"pt-en\", \"messages\".*?)' \\", readme).group(1)
        shown = json_format.Parse(
            re.search(r"Inference/Chat\n(\{.*?\n\})", readme, re.S).group(1), pb2.GenerateResponse()
        )
        answer = inference.Chat(json_format.Parse(call, pb2.ChatRequest()), timeout=300)
        assert answer.text == shown.text and answer.finish_reason == shown.finish_reason
        assert answer.usage.prompt_tokens == shown.usage.prompt_tokens
        message = re.search(r"Code: InvalidArgument\n\s+Message: (.*)\n", readme).group(1)
        bad = json_format.Parse('{"adapter_id": "../x", "prompt": "hi"}', pb2.GenerateRequest())
        with pytest.raises(grpc.RpcError) as failure:
            inference.Generate(bad, timeout=60)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and failure.value.details() == message
