"""The OpenAI-compatible API through OpenAI's own Python client (and raw SSE through httpx):
greedy outputs equal gRPC's, streaming and not, on the same engine."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from loraserve_client import Client
from tests.helpers import PROMPTS, settle

ADAPTERS = ["a1", "org/a2", "a3", "", "a6"]
MAX_TOKENS = 12


@pytest.fixture
def oai(base_url: str) -> openai.OpenAI:
    with openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def model_name(http_server, adapter: str) -> str:
    return adapter or http_server.engine.loaded.name


def test_models_lists_the_base_model_and_every_adapter_of_the_store(oai, http_server) -> None:
    models = {m.id: m for m in oai.models.list()}
    base = http_server.engine.loaded.name
    assert set(models) == {base, "a1", "org/a2", "a3", "a4", "a5", "a6"}
    assert models["org/a2"].owned_by == "org"
    assert models["a1"].owned_by == "loraserve"
    assert oai.models.retrieve("org/a2").owned_by == "org"
    assert oai.models.retrieve("__base__").id == base
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-adapter")


def test_chat_completions_equal_grpc_chat_greedy(oai, http_server) -> None:
    with Client(http_server.target, timeout=60) as grpc_client:
        for prompt, adapter in zip(PROMPTS, ADAPTERS):
            messages = [{"role": "user", "content": prompt}]
            expected = grpc_client.chat(messages, adapter, max_new_tokens=MAX_TOKENS)
            answer = oai.chat.completions.create(
                model=model_name(http_server, adapter),
                messages=messages,
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            assert answer.choices[0].message.content == expected.text
            length = expected.finish_reason.lower().endswith("length")
            assert answer.choices[0].finish_reason == ("length" if length else "stop")
            assert answer.usage.prompt_tokens == expected.usage.prompt_tokens
            assert answer.usage.completion_tokens == expected.usage.completion_tokens
            assert answer.usage.total_tokens == expected.usage.total_tokens
            chunks = list(
                oai.chat.completions.create(
                    model=model_name(http_server, adapter),
                    messages=messages,
                    max_completion_tokens=MAX_TOKENS,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == expected.text
            assert chunks[0].choices[0].delta.role == "assistant"
            assert (
                chunks[-1].choices == []
                and chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
            )
    settle(http_server)


def test_completions_equal_grpc_generate_greedy(oai, http_server) -> None:
    with Client(http_server.target, timeout=60) as grpc_client:
        for prompt, adapter in zip(PROMPTS, ADAPTERS):
            expected = grpc_client.generate(prompt, adapter, max_new_tokens=MAX_TOKENS)
            model = model_name(http_server, adapter)
            answer = oai.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            assert answer.choices[0].text == expected.text
            assert answer.usage.completion_tokens == expected.usage.completion_tokens
            streamed = oai.completions.create(
                model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
            chunks = list(streamed)
            assert "".join(c.choices[0].text for c in chunks) == expected.text
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            # Token ids as the prompt give the same answer.
            by_ids = oai.completions.create(
                model=model,
                prompt=expected_prompt_ids(grpc_client, prompt),
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            assert by_ids.choices[0].text == expected.text


def expected_prompt_ids(grpc_client: Client, prompt: str) -> list[int]:
    return grpc_client.tokenize(prompt).token_ids


def test_stop_and_seed_and_sampling(oai, http_server) -> None:
    model = "a1"
    full = (
        oai.completions.create(model=model, prompt="hello world", max_tokens=10, temperature=0)
        .choices[0]
        .text
    )
    stop = full[3:5]
    if stop.strip():
        cut = oai.completions.create(
            model=model, prompt="hello world", max_tokens=10, temperature=0, stop=stop
        )
        assert cut.choices[0].text == full[: full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    sampled = [
        oai.completions.create(model=model, prompt="hello", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_sse_is_openai_chunk_format_ending_with_done(base_url) -> None:
    body = {
        "model": "a1",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_vllm_adapter_admin(base_url, toy, tmp_path) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        loaded = http.post(
            "/v1/load_lora_adapter", json={"lora_name": "a4", "lora_path": str(toy.adapter("a4"))}
        )
        assert loaded.status_code == 200, loaded.text
        assert "a4" in loaded.text
        relative = http.post("/v1/load_lora_adapter", json={"lora_name": "a4", "lora_path": "a4"})
        assert relative.status_code == 200, relative.text
        outside = http.post("/v1/load_lora_adapter", json={"lora_name": "a4", "lora_path": str(tmp_path)})
        assert (
            outside.status_code == 400 and "outside the adapter store" in outside.json()["error"]["message"]
        )
        escape = http.post("/v1/load_lora_adapter", json={"lora_name": "a4", "lora_path": "../store/../.."})
        assert escape.status_code == 400
        other = http.post("/v1/load_lora_adapter", json={"lora_name": "a4", "lora_path": "a3"})
        assert (
            other.status_code == 400 and "not the folder of adapter 'a4'" in other.json()["error"]["message"]
        )
        missing = http.post("/v1/load_lora_adapter", json={"lora_name": "nope"})
        assert missing.status_code == 404
        bad = http.post("/v1/load_lora_adapter", json={"lora_name": "../x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_name"
        unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "a4"})
        assert unloaded.status_code == 200, unloaded.text
        again = http.post("/v1/unload_lora_adapter", json={"lora_name": "a4"})
        assert again.status_code == 404


def test_cached_prompt_tokens_are_reported_as_openai_does(oai, http_server) -> None:
    from loraserve.generation import Usage

    if "cached_prompt_tokens" not in Usage.__dataclass_fields__:
        pytest.skip("this core counts no cached prompt tokens (no prefix cache)")
    # A system prompt longer than a KV block: the second request finds its blocks cached.
    messages = [
        {"role": "system", "content": " ".join(PROMPTS * 4)},
        {"role": "user", "content": "hello"},
    ]
    answers = [
        oai.chat.completions.create(model="a1", messages=messages, max_tokens=2, temperature=0)
        for _ in range(2)
    ]
    details = [a.usage.prompt_tokens_details for a in answers]
    assert all(d is not None for d in details)
    if http_server.config.model_dump().get("enable_prefix_caching"):
        assert details[1].cached_tokens > 0
    assert details[1].cached_tokens < answers[1].usage.prompt_tokens


def test_playground_page_is_self_contained(base_url) -> None:
    """One page that fetches nothing from elsewhere (its policy forbids it) and uses only /v1."""
    page = httpx.get(base_url + "/", timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "connect-src 'self'" in policy and "default-src 'none'" in policy
    assert "://" not in page.text and "<script src" not in page.text
    paths = set(re.findall(r'"(/[a-z0-9/_]+)"', page.text))
    assert paths == {"/v1/models", "/v1/chat/completions", "/v1/completions"}
