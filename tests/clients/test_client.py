"""Every client method, sync and asyncio, against a real server; typed errors; gRPC's retries
(against a scripted server that fails on cue, to count the attempts)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from loraserve.auth import key_entry_toml
from loraserve_client import (
    AdapterNotFound,
    AdapterRejected,
    AsyncClient,
    Client,
    ClientOptions,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from loraserve_client.api import loraserve_pb2 as pb2
from loraserve_client.api import loraserve_pb2_grpc as pb2_grpc
from tests.helpers import ServerThread, free_port


def test_sync_client_methods(client: Client, peft_ref) -> None:
    ids = peft_ref.tokenizer("hello world")["input_ids"]
    result = client.generate("hello world", "a1", max_new_tokens=6)
    assert result.token_ids == peft_ref.generate(ids, "a1", 6) and result.finish_reason in ("length", "eos")
    assert result.request_id and result.usage.total_tokens == result.usage.prompt_tokens + 6
    chunks = list(client.generate_stream("hello world", "a1", max_new_tokens=6))
    assert "".join(c.text for c in chunks) == result.text and chunks[-1].usage == result.usage
    answer = client.chat(
        [{"role": "user", "content": "hi"}, ("assistant", "yo"), ("user", "again")],
        "org/a2",
        max_new_tokens=5,
    )
    streamed = list(
        client.chat_stream(
            [("user", "hi"), ("assistant", "yo"), ("user", "again")], "org/a2", max_new_tokens=5
        )
    )
    assert "".join(c.text for c in streamed) == answer.text
    tokens = client.tokenize("hello world")
    assert tokens.token_ids == ids and len(tokens.tokens) == len(ids)
    assert client.tokenize(messages=[("user", "hi")]).token_ids[0] == peft_ref.tokenizer.bos_token_id
    info = client.model_info()
    assert info.architecture == "LlamaForCausalLM" and info.max_loaded_adapters == 2 and info.vocab_size > 256
    loaded = client.load_adapter("a3")
    assert loaded.adapter.state == "device" and loaded.load_seconds > 0
    assert "a3" in {a.adapter_id for a in client.list_adapters()}
    assert len(client.list_adapters(include_disk=True)) >= 6
    unloaded = client.unload_adapter("a3")
    assert unloaded.adapter_id == "a3"
    assert client.health() == "SERVING"
    sampled = client.generate(
        "hello", "a1", max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=7, repetition_penalty=1.2
    )
    again = client.generate(
        "hello", "a1", max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=7, repetition_penalty=1.2
    )
    assert sampled.token_ids == again.token_ids


def test_async_client_methods(server, peft_ref) -> None:
    async def run() -> None:
        async with AsyncClient(server.target) as client:
            results = await asyncio.gather(
                *(client.generate("hello world", a, max_new_tokens=6) for a in ("", "a1", "org/a2", "a4"))
            )
            ids = peft_ref.tokenizer("hello world")["input_ids"]
            for adapter, result in zip(("", "a1", "org/a2", "a4"), results):
                assert result.token_ids == peft_ref.generate(ids, adapter, 6)
            chunks = [c async for c in client.generate_stream("hello world", "a1", max_new_tokens=6)]
            assert "".join(c.text for c in chunks) == results[1].text
            answer = await client.chat([("user", "hi")], "a1", max_new_tokens=4)
            streamed = [c async for c in client.chat_stream([("user", "hi")], "a1", max_new_tokens=4)]
            assert "".join(c.text for c in streamed) == answer.text
            assert (await client.tokenize("hello world")).token_ids == ids
            assert (await client.model_info()).quantization == "nf4"
            assert (await client.load_adapter("a6")).adapter.state == "device"
            assert "a6" in {a.adapter_id for a in await client.list_adapters()}
            assert (await client.unload_adapter("a6")).adapter_id == "a6"
            assert await client.health() == "SERVING"
            with pytest.raises(AdapterNotFound):
                await client.generate("hi", "nope")
            with pytest.raises(InvalidRequest):
                async for _ in client.generate_stream("", "a1"):
                    pass

    asyncio.run(run())


def test_each_status_has_its_typed_error(toy, tmp_path, monkeypatch) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(key_entry_toml("lsk_k", "t", ["a1"], admin=False))
    with ServerThread(
        model=str(toy.base),
        adapters_dir=toy.store,
        api_keys_file=keys,
        max_lora_rank=8,
        max_queue_per_tenant=1,
        max_num_seqs=1,
        kv_cache_bytes=2 << 20,
    ) as srv:
        with Client(srv.target, api_key="lsk_k", retries=0) as client:
            with pytest.raises(InvalidRequest):
                client.generate("", "a1")
            with pytest.raises(PermissionDenied):
                client.generate("hi", "a3")
            with pytest.raises(PermissionDenied):
                client.list_adapters()
            with pytest.raises(DeadlineExceeded):
                client.generate("hi", "a1", max_new_tokens=200, ignore_eos=True, timeout=0.001)
            deadline = time.monotonic() + 120
            while srv.engine.in_flight and time.monotonic() < deadline:  # the cancelled one leaves the engine
                time.sleep(0.01)
            # One request in flight for this tenant is its limit: a second one is refused at once.
            # Once the stream has a token, the engine's next step waits for that refusal: the
            # stream is still in flight then, however fast its 200 tokens would go.
            refused = threading.Event()
            real_execute = srv.engine.runner.execute

            def execute(batch):
                if any(item.seq.output_ids for item in batch):
                    refused.wait(120)
                return real_execute(batch)

            monkeypatch.setattr(srv.engine.runner, "execute", execute)
            stream = client.generate_stream("hi", "a1", max_new_tokens=200, ignore_eos=True)
            try:
                next(stream)
                with pytest.raises(Overloaded, match="limit"):
                    client.generate("hi", "a1", max_new_tokens=2)
            finally:
                refused.set()
            stream.close()
        with Client(srv.target, retries=0) as anonymous, pytest.raises(Unauthenticated):
            anonymous.generate("hi", "a1")
    with (
        ServerThread(
            model=str(toy.base), adapters_dir=toy.store, max_lora_rank=8, kv_cache_bytes=2 << 20
        ) as srv,
        Client(srv.target, retries=0) as client,
    ):
        with pytest.raises(AdapterNotFound):
            client.generate("hi", "missing")
        with pytest.raises(AdapterRejected, match="max_lora_rank"):
            client.generate("hi", "a5")
        monkeypatch.setattr(srv.engine.runner, "execute", lambda batch: 1 / 0)
        with pytest.raises(ServerError):
            client.generate("hi")
    with Client(f"127.0.0.1:{free_port()}", retries=0, timeout=60) as nowhere, pytest.raises(Unavailable):
        nowhere.generate("hi")


class Scripted(pb2_grpc.InferenceServicer):
    """A gRPC server that fails the first calls with a chosen code, counting every attempt, so
    that what gRPC's retry policy does on the client's channel can be seen exactly."""

    def __init__(self, fail_first: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.fail_first, self.code, self.attempts = fail_first, code, 0
        self.lock = threading.Lock()

    def _attempt(self) -> int:
        with self.lock:
            self.attempts += 1
            return self.attempts

    def Generate(self, request, context):
        if self._attempt() <= self.fail_first:
            context.abort(self.code, f"scripted {self.code.name}")
        return pb2.GenerateResponse(text="ok", token_ids=[1])

    def GenerateStream(self, request, context):
        attempt = self._attempt()
        if request.prompt == "fail after the first message":
            yield pb2.GenerateStreamResponse(text="first")
            context.abort(self.code, "scripted failure mid-stream")
        if attempt <= self.fail_first:
            context.abort(self.code, f"scripted {self.code.name}")
        yield pb2.GenerateStreamResponse(text="ok")


@pytest.fixture
def scripted(grpc_server):
    def start(fail_first: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> tuple[str, Scripted]:
        servicer = Scripted(fail_first, code)
        return grpc_server(pb2_grpc.add_InferenceServicer_to_server, servicer), servicer

    return start


def test_unavailable_is_retried_by_grpc_up_to_retries(scripted) -> None:
    target, servicer = scripted(fail_first=3)
    with Client(target, retries=3, backoff=0.01, max_backoff=0.05) as client:
        assert client.generate("hi").text == "ok"
    assert servicer.attempts == 4
    target, servicer = scripted(fail_first=3)
    with Client(target, retries=2, backoff=0.01) as client, pytest.raises(Unavailable, match="scripted"):
        client.generate("hi")
    assert servicer.attempts == 3
    target, servicer = scripted(fail_first=1)
    with Client(target, retries=0) as client, pytest.raises(Unavailable):
        client.generate("hi")
    assert servicer.attempts == 1


def test_only_unavailable_is_retried(scripted) -> None:
    target, servicer = scripted(fail_first=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    with Client(target, retries=4, backoff=0.01) as client, pytest.raises(Overloaded):
        client.generate("hi")
    assert servicer.attempts == 1


def test_a_stream_is_retried_only_before_its_first_message(scripted) -> None:
    target, servicer = scripted(fail_first=2)
    with Client(target, retries=2, backoff=0.01) as client:
        assert [c.text for c in client.generate_stream("hi")] == ["ok"]
    assert servicer.attempts == 3
    target, servicer = scripted(fail_first=0)
    received = []
    with Client(target, retries=4, backoff=0.01) as client, pytest.raises(Unavailable, match="mid-stream"):
        for chunk in client.generate_stream("fail after the first message"):
            received.append(chunk.text)
    assert received == ["first"] and servicer.attempts == 1  # never replayed once text was yielded


def test_async_client_retries_the_same_way(scripted) -> None:
    target, servicer = scripted(fail_first=2)

    async def run() -> None:
        async with AsyncClient(target, retries=2, backoff=0.01) as client:
            assert (await client.generate("hi")).text == "ok"
            assert [c.text async for c in client.generate_stream("hi")] == ["ok"]

    asyncio.run(run())
    assert servicer.attempts == 4  # 2 failed + 1 unary, then the stream at once (fail_first spent)


def test_retries_are_bounded_by_grpcs_limit() -> None:
    with pytest.raises(ValueError, match="between 0 and 4"):
        Client("127.0.0.1:1", retries=5)
    with pytest.raises(ValueError, match="between 0 and 4"):
        ClientOptions(retries=-1)
