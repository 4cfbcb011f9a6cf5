"""The LoRAX-compatible API through LoRAX's own client, `lorax-client` 0.6.3, unchanged.

lorax-client pins old certifi and huggingface-hub, so it runs in a venv of its own, installed
from the package registry; a script there calls the server and prints what it got as JSON.
"""

from __future__ import annotations

import json
import subprocess
import venv

import httpx
import pytest

from loraserve_client import Client
from tests.helpers import PROMPTS, settle

ADAPTERS = ["a1", "org/a2", "", "a3", "a6"]
MAX_NEW_TOKENS = 10

SCRIPT = r"""
import json, sys
from lorax import Client
from lorax.errors import NotFoundError, ValidationError

url, cases = sys.argv[1], json.loads(sys.argv[2])
client = Client(url, timeout=120)
out = []
for prompt, adapter, max_new_tokens in cases:
    response = client.generate(prompt, adapter_id=adapter or None, max_new_tokens=max_new_tokens)
    tokens = [t.id for t in response.details.tokens]
    streamed, final = [], None
    for message in client.generate_stream(prompt, adapter_id=adapter or None, max_new_tokens=max_new_tokens):
        streamed.append(message.token.text)
        if message.generated_text is not None:
            final = message
    out.append({
        "text": response.generated_text,
        "tokens": tokens,
        "finish_reason": response.details.finish_reason.value,
        "generated_tokens": response.details.generated_tokens,
        "prompt_tokens": response.details.prompt_tokens,
        "stream_text": "".join(streamed),
        "stream_final": final.generated_text,
        "stream_generated_tokens": final.details.generated_tokens,
    })
errors = {}
try:
    client.generate("hello", adapter_id="no-such-adapter")
except NotFoundError as error:
    errors["not_found"] = str(error)
try:
    client.generate("hello", adapter_id="a1", adapter_source="hub")
except ValidationError as error:
    errors["adapter_source"] = str(error)
print(json.dumps({"results": out, "errors": errors}))
"""


@pytest.fixture(scope="module")
def lorax_python(tmp_path_factory) -> str:
    env_dir = tmp_path_factory.mktemp("lorax") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = subprocess.run(
        [str(env_dir / "bin" / "pip"), "install", "-q", "lorax-client==0.6.3", "requests"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    return str(env_dir / "bin" / "python")


def test_lorax_client_output_equals_grpc_generate(lorax_python, http_server, base_url) -> None:
    cases = [[prompt, adapter, MAX_NEW_TOKENS] for prompt, adapter in zip(PROMPTS, ADAPTERS)]
    run = subprocess.run(
        [lorax_python, "-c", SCRIPT, base_url, json.dumps(cases)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    with Client(http_server.target, timeout=60) as grpc_client:
        for (prompt, adapter, _), got in zip(cases, report["results"]):
            expected = grpc_client.generate(prompt, adapter, max_new_tokens=MAX_NEW_TOKENS)
            assert got["text"] == expected.text
            assert got["tokens"] == expected.token_ids
            assert got["generated_tokens"] == expected.usage.completion_tokens
            assert got["prompt_tokens"] == expected.usage.prompt_tokens
            assert got["stream_final"] == expected.text
            assert got["stream_generated_tokens"] == expected.usage.completion_tokens
            assert got["finish_reason"] in ("length", "eos_token", "stop_sequence")
    assert "no-such-adapter" in report["errors"]["not_found"]
    assert "adapter_source" in report["errors"]["adapter_source"]
    settle(http_server)


def test_generate_routes_and_refused_parameters(base_url) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        plain = http.post(
            "/generate", json={"inputs": "hello", "parameters": {"adapter_id": "a1", "max_new_tokens": 4}}
        )
        assert plain.status_code == 200 and set(plain.json()) == {"generated_text"}
        full = http.post(
            "/generate",
            json={
                "inputs": "hello",
                "parameters": {"adapter_id": "a1", "max_new_tokens": 4, "return_full_text": True},
            },
        )
        assert full.json()["generated_text"] == "hello" + plain.json()["generated_text"]
        listed = http.post(
            "/", json={"inputs": "hello", "parameters": {"adapter_id": "a1", "max_new_tokens": 4}}
        )
        assert listed.json() == [plain.json()]
        for field, value in (
            ("merged_adapters", {"ids": ["a1", "a3"], "weights": [0.5, 0.5], "density": 1.0}),
            ("response_format", {"type": "json_object", "schema": {}}),
            ("adapter_source", "s3"),
            ("typical_p", 0.5),
        ):
            refused = http.post("/generate", json={"inputs": "hello", "parameters": {field: value}})
            assert refused.status_code == 400, refused.text
            assert refused.json()["error_type"] == "validation"
            assert f"parameters.{field}" in refused.json()["error"]
        too_long = http.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 10_000}})
        assert too_long.status_code == 400 and too_long.json()["error"].startswith(
            "parameters.max_new_tokens"
        )
