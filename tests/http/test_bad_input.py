"""A corpus of bad HTTP requests: each gets a 4xx naming the problem, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import settle

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
LORAX = "/generate"
OK_CHAT = '{"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'

# (path, raw body, expected status, words the error message must contain)
CORPUS = [
    (CHAT, "", 400, ["not valid JSON"]),
    (CHAT, "{", 400, ["not valid JSON"]),
    (CHAT, '{"model": "a1", "messages": [}', 400, ["not valid JSON"]),
    (CHAT, "[1, 2]", 400, ["JSON object"]),
    (CHAT, '"just a string"', 400, ["JSON object"]),
    (CHAT, "\xff\xfe{}", 400, ["JSON"]),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}]}', 400, ["model is required"]),
    (CHAT, '{"model": "a1"}', 400, ["messages is required"]),
    (CHAT, '{"model": "a1", "messages": []}', 400, ["messages"]),
    (CHAT, '{"model": "a1", "messages": "hi"}', 400, ["messages"]),
    (CHAT, '{"model": "a1", "messages": [{"role": "robot", "content": "hi"}]}', 400, ["messages[0].role"]),
    (CHAT, '{"model": "a1", "messages": [{"role": "user"}]}', 400, ["content is required"]),
    (CHAT, '{"model": "a1", "messages": [{"role": "user", "content": 5}]}', 400, ["messages[0].content"]),
    (
        CHAT,
        '{"model": "a1", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
        400,
        ["image_url", "only text parts"],
    ),
    (CHAT, OK_CHAT[:-1] + ', "max_tokens": "2"}', 400, ["max_tokens"]),
    (CHAT, OK_CHAT[:-1] + ', "temperature": "hot"}', 400, ["temperature"]),
    (CHAT, OK_CHAT[:-1] + ', "temperature": -1}', 400, ["temperature"]),
    (CHAT, OK_CHAT[:-1] + ', "temperature": 1e400}', 400, ["temperature"]),
    (CHAT, OK_CHAT[:-1] + ', "top_p": 0}', 400, ["top_p"]),
    (CHAT, OK_CHAT[:-1] + ', "seed": -1}', 400, ["seed"]),
    (CHAT, OK_CHAT[:-1] + ', "seed": 1e3}', 400, ["seed"]),
    (CHAT, OK_CHAT[:-1] + ', "stop": 5}', 400, ["stop", "string"]),
    (CHAT, OK_CHAT[:-1] + ', "stop": [""]}', 400, ["stop[0] is empty"]),
    (
        CHAT,
        OK_CHAT[:-1]
        + ', "stop": ["x", "y", "z", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n"]}',
        400,
        ["stop has 17 entries"],
    ),
    (CHAT, OK_CHAT[:-1] + ', "stream": "yes"}', 400, ["stream"]),
    (CHAT, OK_CHAT[:-1] + ', "stream_options": {"include_usage": true}}', 400, ["stream_options"]),
    (CHAT, OK_CHAT[:-1] + ', "n": 3}', 400, ["n must be 1"]),
    (CHAT, OK_CHAT[:-1] + ', "frequency_penalty": 1}', 400, ["frequency_penalty"]),
    (CHAT, OK_CHAT[:-1] + ', "logprobs": true}', 400, ["logprobs"]),
    (CHAT, OK_CHAT[:-1] + ', "tools": [{"type": "function"}]}', 400, ["tools"]),
    (CHAT, OK_CHAT[:-1] + ', "response_format": {"type": "json_object"}}', 400, ["response_format"]),
    (CHAT, OK_CHAT[:-1] + ', "max_tokens": 2, "max_completion_tokens": 3}', 400, ["max_completion_tokens"]),
    (CHAT, OK_CHAT[:-1] + ', "max_tokens": 100000}', 400, ["max_tokens", "context"]),
    (CHAT, OK_CHAT[:-1] + ', "frobnicate": 1}', 400, ["unknown field 'frobnicate'"]),
    (CHAT, '{"model": "../etc", "messages": [{"role": "user", "content": "hi"}]}', 400, ["model", "`..`"]),
    (CHAT, '{"model": "a/b/c", "messages": [{"role": "user", "content": "hi"}]}', 400, ["model"]),
    (TEXT, '{"model": "a1"}', 400, ["prompt is required"]),
    (TEXT, '{"model": "a1", "prompt": ""}', 400, ["prompt is empty"]),
    (TEXT, '{"model": "a1", "prompt": ["a", "b"]}', 400, ["2 prompts"]),
    (TEXT, '{"model": "a1", "prompt": [1, "a"]}', 400, ["prompt"]),
    (TEXT, '{"model": "a1", "prompt": [99999999]}', 400, ["prompt[0]", "not a token id"]),
    (TEXT, '{"model": "a1", "prompt": "hi", "echo": true}', 400, ["echo"]),
    (TEXT, '{"model": "a1", "prompt": "hi", "best_of": 2}', 400, ["best_of"]),
    (TEXT, '{"model": "a1", "prompt": "hi", "suffix": "x"}', 400, ["suffix"]),
    (LORAX, '{"parameters": {}}', 400, ["inputs is required"]),
    (LORAX, '{"inputs": ""}', 400, ["inputs"]),
    (LORAX, '{"inputs": "hi", "parameters": {"max_new_tokens": 0}}', 400, ["parameters.max_new_tokens"]),
    (LORAX, '{"inputs": "hi", "parameters": {"top_k": "3"}}', 400, ["parameters.top_k"]),
    (LORAX, '{"inputs": "hi", "parameters": {"watermark": true}}', 400, ["parameters.watermark"]),
    (LORAX, '{"inputs": "hi", "parameters": {"adapter_id": "a1", "bogus": 1}}', 400, ["parameters.bogus"]),
    (
        LORAX,
        '{"inputs": "hi", "parameters": {"repetition_penalty": 0}}',
        400,
        ["parameters.repetition_penalty"],
    ),
]


def message(response: httpx.Response) -> str:
    body = response.json()
    error = body["error"]
    return error["message"] if isinstance(error, dict) else error


@pytest.mark.parametrize(("path", "raw", "status", "words"), CORPUS)
def test_bad_request_is_refused_by_name(base_url, path, raw, status, words) -> None:
    response = httpx.post(
        base_url + path,
        content=raw.encode("latin-1") if raw.startswith("\xff") else raw.encode(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text
    for word in words:
        assert word in message(response), (word, response.text)


def test_bodies_over_the_limit_and_wrong_paths(http_server, base_url) -> None:
    limit = http_server.config.http_max_body_bytes
    huge = b'{"model": "a1", "prompt": "' + b"x" * (limit + 10) + b'"}'
    with httpx.Client(base_url=base_url, timeout=60) as http:
        declared = http.post(TEXT, content=huge, headers={"content-type": "application/json"})
        assert declared.status_code == 413 and f"{limit} bytes" in message(declared)

        def chunked():
            for start in range(0, len(huge), 65536):
                yield huge[start : start + 65536]

        streamed = http.post(TEXT, content=chunked(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "over the limit" in message(streamed)
        lorax = http.post(LORAX, content=huge)
        assert lorax.status_code == 413 and lorax.json()["error_type"] == "validation"
        assert http.post("/v1/nowhere", json={}).status_code == 404
        assert "no such path" in message(http.post("/v1/nowhere", json={}))
        assert http.get(CHAT).status_code == 405
        assert http.delete("/v1/models").status_code == 405
    # The server keeps serving, on both front ends.
    ok = httpx.post(base_url + CHAT, content=OK_CHAT, timeout=60)
    assert ok.status_code == 200, ok.text
    settle(http_server)
