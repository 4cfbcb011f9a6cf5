"""Every error class over HTTP: the status of docs/api.md's table, OpenAI's and LoRAX's body shapes,
and the `openai` client's own typed exceptions. Same keys file and rights as gRPC."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from loraserve.auth import key_entry_toml
from loraserve_client import Client, PermissionDenied
from tests.helpers import ServerThread, free_port, settle
from tests.http.conftest import HeldEngine

ACME = "lsk_acme-test-key-0001"
OPS = "lsk_ops-test-key-0002"
BASIC = "lsk_basic-test-key-0003"


@pytest.fixture(scope="module")
def keyed(toy, tmp_path_factory) -> ServerThread:
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(
        key_entry_toml(ACME, "acme", ["a1", "org/*"], admin=False, base_model=False)
        + key_entry_toml(OPS, "ops", ["*"], admin=True)
        + key_entry_toml(BASIC, "basic", ["*"], admin=False)
    )
    srv = ServerThread(
        model=str(toy.base),
        adapters_dir=toy.store,
        api_keys_file=keys,
        kv_cache_bytes=2 << 20,
        max_lora_rank=8,  # a5 (rank 16) is in the store but not servable: 422
        max_queue_per_tenant=1,  # a second request of a tenant with one running: 429
        http_port=free_port(),
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def url(keyed: ServerThread) -> str:
    return f"http://127.0.0.1:{keyed.server.http.port}"


def oai(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat(client: openai.OpenAI, model: str = "a1", **kwargs) -> str:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, **kwargs
    )
    return answer.choices[0].message.content


def test_keys_and_rights(url) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        chat(oai(url, "lsk_wrong"))
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    assert chat(oai(url, ACME)) is not None
    with pytest.raises(openai.PermissionDeniedError) as denied:
        chat(oai(url, ACME), model="a3")
    assert denied.value.status_code == 403 and "a3" in denied.value.message
    with pytest.raises(openai.PermissionDeniedError, match="base model"):
        chat(oai(url, ACME), model="__base__")
    # A key lists what it may use.
    assert {m.id for m in oai(url, ACME).models.list()} == {"a1", "org/a2"}
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/health").status_code == 200  # health needs no key
        missing = http.post("/v1/chat/completions", json={"model": "a1", "messages": []})
        assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
        assert missing.json()["error"]["type"] == "authentication_error"
        load = {"lora_name": "a3"}
        assert http.post("/v1/load_lora_adapter", json=load).status_code == 401
        refused = http.post("/v1/load_lora_adapter", json=load, headers={"Authorization": f"Bearer {BASIC}"})
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        ok = http.post("/v1/load_lora_adapter", json=load, headers={"Authorization": f"Bearer {OPS}"})
        assert ok.status_code == 200, ok.text
        lorax = http.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "a3"}})
        assert lorax.status_code == 401 and set(lorax.json()) == {"error", "error_type"}
        lorax = http.post(
            "/generate",
            json={"inputs": "hi", "parameters": {"adapter_id": "a1", "max_new_tokens": 2}},
            headers={"Authorization": f"Bearer {ACME}"},
        )
        assert lorax.status_code == 200, lorax.text


def test_invalid_unknown_and_unservable(url) -> None:
    client = oai(url, OPS)
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, top_p=1.5)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        chat(client, presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        chat(client, n=2)
    with pytest.raises(openai.NotFoundError) as unknown:
        chat(client, model="no-such-adapter")
    assert unknown.value.status_code == 404 and unknown.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as rejected:
        chat(client, model="a5")
    assert rejected.value.status_code == 422 and "max_lora_rank" in rejected.value.message
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {OPS}"}) as http:
        lorax = http.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "no-such-adapter"}})
        assert lorax.status_code == 404 and "no-such-adapter" in lorax.json()["error"]


def test_overload_deadline_and_internal_errors(keyed, url, monkeypatch) -> None:
    held = HeldEngine(keyed, monkeypatch)
    first: list[str] = []
    runner = threading.Thread(target=lambda: first.append(chat(oai(url, BASIC))))
    runner.start()
    try:
        assert held.entered.wait(120)
        with pytest.raises(openai.RateLimitError) as overloaded:
            chat(oai(url, BASIC))  # the same tenant, already at its limit of 1
        assert overloaded.value.status_code == 429
        assert overloaded.value.response.headers["x-should-retry"] == "false"
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {OPS}"}) as http:
            late = http.post(
                "/v1/completions",
                json={"model": "org/a2", "prompt": "hi", "max_tokens": 4},
                headers={"X-Request-Timeout": "0.3"},
            )
            assert late.status_code == 504 and late.json()["error"]["type"] == "timeout_error"
            busy = http.post("/generate", json={"inputs": "hi"}, headers={"Authorization": f"Bearer {BASIC}"})
            assert busy.status_code == 429 and busy.json()["error_type"] == "overloaded"
            malformed = http.post(
                "/v1/completions",
                json={"model": "a1", "prompt": "hi"},
                headers={"X-Request-Timeout": "soon"},
            )
            assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "x-request-timeout"
    finally:
        held.release()
        runner.join(120)
    assert first and first[0] is not None
    monkeypatch.setattr(keyed.engine.runner, "execute", lambda batch: 1 / 0)
    with pytest.raises(openai.InternalServerError) as internal:
        chat(oai(url, OPS))
    assert internal.value.status_code == 500 and "request id" in internal.value.message
    monkeypatch.undo()
    assert chat(oai(url, OPS)) is not None  # the server keeps serving
    settle(keyed)


def test_same_keys_and_rights_as_grpc(keyed) -> None:
    with Client(keyed.target, api_key=ACME, retries=0) as client, pytest.raises(PermissionDenied):
        client.generate("hi", "a3")
