"""A corpus of bad requests: each gets its status code and a message naming the problem,
and afterwards the server is healthy and answers a normal request correctly."""

from __future__ import annotations

import contextlib
import math

import grpc
import pytest

from loraserve_client.api import loraserve_pb2 as pb2
from tests.helpers import PROMPTS, ServerThread

LIMITS = {
    "max_prompt_tokens": 64,
    "max_prompt_chars": 2000,
    "max_messages": 8,
    "max_stop_sequences": 4,
    "max_stop_sequence_chars": 32,
    "max_request_seconds": 60.0,
    "max_lora_rank": 8,
}
INV, NF, FP = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION


def gen(prompt: str = "hello", adapter: str = "", sampling: dict | None = None, stopping: dict | None = None):
    request = pb2.GenerateRequest(prompt=prompt, adapter_id=adapter)
    if sampling is not None:
        request.sampling.CopyFrom(pb2.SamplingParams(**sampling))
    if stopping is not None:
        request.stopping.CopyFrom(pb2.StoppingCriteria(**stopping))
    return request.SerializeToString()


def chat(messages: list[tuple[str, str]], adapter: str = "") -> bytes:
    return pb2.ChatRequest(
        adapter_id=adapter, messages=[pb2.ChatMessage(role=r, content=c) for r, c in messages]
    ).SerializeToString()


def raw_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field with arbitrary bytes (e.g. invalid UTF-8)."""
    return bytes([(number << 3) | 2, len(payload)]) + payload


NAN, INF = math.nan, math.inf
# id: (method, request bytes, expected code, text the message must contain)
CASES: dict[str, tuple[str, bytes, grpc.StatusCode, str]] = {
    "empty prompt": ("Generate", gen(""), INV, "prompt is empty"),
    "huge prompt": ("Generate", gen("x" * 5000), INV, "limit is 2000"),
    "prompt over the token limit": ("Generate", gen("hello world " * 60), INV, "limit is 64"),
    "prompt + max_new_tokens over context": (
        "Generate",
        gen(stopping={"max_new_tokens": 1000}),
        INV,
        "context of 256",
    ),
    "negative temperature": ("Generate", gen(sampling={"temperature": -0.5}), INV, "sampling.temperature"),
    "NaN temperature": ("Generate", gen(sampling={"temperature": NAN}), INV, "sampling.temperature"),
    "infinite temperature": ("Generate", gen(sampling={"temperature": INF}), INV, "sampling.temperature"),
    "temperature above 100": ("Generate", gen(sampling={"temperature": 1000}), INV, "sampling.temperature"),
    "top_p zero": ("Generate", gen(sampling={"top_p": 0.0}), INV, "sampling.top_p"),
    "top_p above one": ("Generate", gen(sampling={"top_p": 1.5}), INV, "sampling.top_p"),
    "top_p NaN": ("Generate", gen(sampling={"top_p": NAN}), INV, "sampling.top_p"),
    "negative top_p": ("Generate", gen(sampling={"top_p": -0.1}), INV, "sampling.top_p"),
    "zero repetition penalty": (
        "Generate",
        gen(sampling={"repetition_penalty": 0.0}),
        INV,
        "repetition_penalty",
    ),
    "negative repetition penalty": (
        "Generate",
        gen(sampling={"repetition_penalty": -2}),
        INV,
        "repetition_penalty",
    ),
    "infinite repetition penalty": (
        "Generate",
        gen(sampling={"repetition_penalty": INF}),
        INV,
        "repetition_penalty",
    ),
    "too many stop sequences": (
        "Generate",
        gen(stopping={"stop_sequences": list("abcde")}),
        INV,
        "limit is 4",
    ),
    "empty stop sequence": (
        "Generate",
        gen(stopping={"stop_sequences": ["ok", ""]}),
        INV,
        "stop_sequences[1] is empty",
    ),
    "over-long stop sequence": ("Generate", gen(stopping={"stop_sequences": ["y" * 40]}), INV, "limit is 32"),
    "negative time limit": ("Generate", gen(stopping={"max_time_seconds": -1}), INV, "max_time_seconds"),
    "time limit above the server's": (
        "Generate",
        gen(stopping={"max_time_seconds": 1e6}),
        INV,
        "max_time_seconds",
    ),
    "NaN time limit": ("Generate", gen(stopping={"max_time_seconds": NAN}), INV, "max_time_seconds"),
    "adapter ../x": ("Generate", gen(adapter="../x"), INV, "adapter_id"),
    "adapter /etc/passwd": ("Generate", gen(adapter="/etc/passwd"), INV, "adapter_id"),
    "adapter a/../../b": ("Generate", gen(adapter="a/../../b"), INV, "adapter_id"),
    "adapter with three segments": ("Generate", gen(adapter="a/b/c"), INV, "at most two segments"),
    "adapter with a NUL byte": ("Generate", gen(adapter="a\x00b"), INV, "adapter_id"),
    "over-long adapter id": ("Generate", gen(adapter="a" * 300), INV, "longer than 128"),
    "url-encoded traversal": ("Generate", gen(adapter="%2e%2e"), INV, "adapter_id"),
    "adapter id with spaces": ("Generate", gen(adapter="my adapter"), INV, "adapter_id"),
    "unknown adapter": ("Generate", gen(adapter="nope"), NF, "not found"),
    "unknown org adapter": ("Generate", gen(adapter="org/nope"), NF, "not found"),
    "rank above the server limit": ("Generate", gen(adapter="a5"), FP, "max_lora_rank 8"),
    "invalid UTF-8 prompt": ("Generate", raw_field(2, b"\xff\xfe\xfd"), INV, "invalid UTF-8"),
    "truncated message": ("Generate", b"\x12\x40abc", INV, "not a valid loraserve.v1.GenerateRequest"),
    "prompt sent as a varint": ("Generate", b"\x10\x05", INV, "prompt is empty"),
    "garbage bytes": ("Generate", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", INV, "not a valid"),
    "stream: bad top_p": ("GenerateStream", gen(sampling={"top_p": 2.0}), INV, "sampling.top_p"),
    "stream: unknown adapter": ("GenerateStream", gen(adapter="missing"), NF, "not found"),
    "chat: no messages": ("Chat", chat([]), INV, "messages is empty"),
    "chat: unknown role": ("Chat", chat([("robot", "hi")]), INV, "messages[0].role"),
    "chat: empty role": ("Chat", chat([("user", "hi"), ("", "x")]), INV, "messages[1].role"),
    "chat: too many messages": ("Chat", chat([("user", "hi")] * 9), INV, "limit is 8"),
    "chat: huge message": ("Chat", chat([("user", "z" * 3000)]), INV, "messages[0].content"),
    "chat: malicious adapter": ("Chat", chat([("user", "hi")], "../../etc"), INV, "adapter_id"),
    "chat: invalid UTF-8 role": ("Chat", raw_field(2, raw_field(1, b"\xc3\x28")), INV, "invalid UTF-8"),
    "chat stream: bad role": ("ChatStream", chat([("admin", "hi")]), INV, "messages[0].role"),
    "tokenize: empty prompt": ("Tokenize", pb2.TokenizeRequest().SerializeToString(), INV, "prompt is empty"),
    "load: empty id": (
        "LoadAdapter",
        pb2.LoadAdapterRequest().SerializeToString(),
        INV,
        "adapter_id is empty",
    ),
    "load: traversal": (
        "LoadAdapter",
        pb2.LoadAdapterRequest(adapter_id="../../etc").SerializeToString(),
        INV,
        "adapter_id",
    ),
    "load: unknown": (
        "LoadAdapter",
        pb2.LoadAdapterRequest(adapter_id="ghost").SerializeToString(),
        NF,
        "not found",
    ),
    "load: too large rank": (
        "LoadAdapter",
        pb2.LoadAdapterRequest(adapter_id="a5").SerializeToString(),
        FP,
        "max_lora_rank",
    ),
    "load: three segments": (
        "LoadAdapter",
        pb2.LoadAdapterRequest(adapter_id="a/b/c").SerializeToString(),
        INV,
        "at most two segments",
    ),
    "unload: empty id": (
        "UnloadAdapter",
        pb2.UnloadAdapterRequest().SerializeToString(),
        INV,
        "adapter_id is empty",
    ),
    "unload: traversal": (
        "UnloadAdapter",
        pb2.UnloadAdapterRequest(adapter_id="../a1").SerializeToString(),
        INV,
        "adapter_id",
    ),
    "tokenize: unknown role": (
        "Tokenize",
        pb2.TokenizeRequest(messages=[pb2.ChatMessage(role="root", content="hi")]).SerializeToString(),
        INV,
        "messages[0].role",
    ),
    "tokenize: huge prompt": (
        "Tokenize",
        pb2.TokenizeRequest(prompt="x" * 5000).SerializeToString(),
        INV,
        "limit is 2000",
    ),
    "chat: over the token limit": ("Chat", chat([("user", "hello world " * 60)]), INV, "limit is 64"),
    "chat stream: unknown adapter": ("ChatStream", chat([("user", "hi")], "ghost"), NF, "not found"),
    "stream: adapter with a NUL byte": ("GenerateStream", gen(adapter="a\x00b"), INV, "adapter_id"),
    "stream: prompt + max_new_tokens over context": (
        "GenerateStream",
        gen(stopping={"max_new_tokens": 1000}),
        INV,
        "context of 256",
    ),
    "unload: not loaded": (
        "UnloadAdapter",
        pb2.UnloadAdapterRequest(adapter_id="a6").SerializeToString(),
        NF,
        "not loaded",
    ),
}
SERVICE = {"LoadAdapter": "AdapterAdmin", "UnloadAdapter": "AdapterAdmin"}


@pytest.fixture(scope="module")
def strict_server(toy):
    with ServerThread(
        model=str(toy.base), adapters_dir=toy.store, max_loaded_adapters=2, kv_cache_bytes=4 << 20, **LIMITS
    ) as srv:
        channel = grpc.insecure_channel(srv.target)
        srv.channel = channel
        yield srv
        channel.close()


def _call(channel: grpc.Channel, method: str, payload: bytes):
    path = f"/loraserve.v1.{SERVICE.get(method, 'Inference')}/{method}"
    if method.endswith("Stream"):
        return list(channel.unary_stream(path)(payload, timeout=30))
    return channel.unary_unary(path)(payload, timeout=30)


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_status(strict_server, case: str) -> None:
    method, payload, code, text = CASES[case]
    with pytest.raises(grpc.RpcError) as caught:
        _call(strict_server.channel, method, payload)
    assert caught.value.code() == code, caught.value.details()
    assert text in caught.value.details(), caught.value.details()


def test_server_is_healthy_and_correct_after_the_corpus(strict_server, peft_ref) -> None:
    from loraserve_client import Client

    for case in CASES.values():  # the whole corpus again, back to back
        with contextlib.suppress(grpc.RpcError):
            _call(strict_server.channel, case[0], case[1])
    with Client(strict_server.target) as client:
        assert client.health() == "SERVING"
        for adapter in ["", "a1", "org/a2"]:
            ids = peft_ref.tokenizer(PROMPTS[0])["input_ids"]
            assert client.generate(PROMPTS[0], adapter, max_new_tokens=8).token_ids == peft_ref.generate(
                ids, adapter, 8
            )
    engine = strict_server.engine
    assert engine.in_flight == 0 and engine.blocks.num_free == engine.blocks.num_blocks
    errors = strict_server.metrics.request_errors
    assert errors.labels("INVALID_ARGUMENT")._value.get() >= 2 * sum(c[2] == INV for c in CASES.values())
