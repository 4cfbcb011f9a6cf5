"""The Training service attacked as a hostile (or careless) tenant would, over a real port.

Each test is a defect found by probing the service, or a property that held up under attack
and must keep holding: store damage through adapter ids, malformed data reaching the tokenizer
as INTERNAL errors, the data-preparation threads starving serving, the quota, the base model's
weights after a job, and what a job leaves behind (KV blocks, pins, watchers, gradients).
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import threading
import time

import pytest
import torch

from loraserve.auth import key_entry_toml
from loraserve_client import (
    AdapterRejected,
    AlreadyExists,
    AsyncClient,
    Client,
    InvalidRequest,
    LoraserveError,
    Overloaded,
)
from tests.helpers import ServerThread, Toy

PAIRS = [("red", "apple"), ("blue", "sky"), ("green", "grass"), ("yellow", "sun"), ("white", "snow")]
DATA = "\n".join(json.dumps({"prompt": f"color {c} ->", "completion": f" {w}"}) for c, w in PAIRS).encode()
QUICK = {"steps": 2, "batch_size": 5}
LONG = {"steps": 100_000, "batch_size": 5}
# Prompts whose outputs changed after one job before the layout round trip kept the packed weights.
PROMPTS = ["hello world", "once upon a time", "blue", "10 20 30"]
ADAPTERS = ["", "a1", "org/a2", "a3"]
REFUSED = (InvalidRequest, AlreadyExists, AdapterRejected)


@pytest.fixture(scope="module")
def shared(toy: Toy, tmp_path_factory: pytest.TempPathFactory):
    """One server for the tests that only create jobs that are refused or cancelled."""
    store = tmp_path_factory.mktemp("attacks") / "store"
    shutil.copytree(toy.store, store)
    with ServerThread(model=str(toy.base), adapters_dir=store, kv_cache_bytes=2 << 20) as srv:
        yield srv


def wait_done(client: Client, job_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_training_job(job_id)
        if job.done:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never ended: {job}")


def cancel_all(client: Client) -> None:
    for job in client.list_training_jobs():
        if not job.done:
            client.cancel_training_job(job.job_id)
    for job in client.list_training_jobs():
        wait_done(client, job.job_id)


def greedy(client: Client) -> dict[tuple[str, str], list[int]]:
    return {
        (adapter, prompt): client.generate(prompt, adapter, max_new_tokens=16, ignore_eos=True).token_ids
        for adapter in ADAPTERS
        for prompt in PROMPTS
    }


def settled(srv: ServerThread, timeout: float = 60.0) -> bool:
    engine, deadline = srv.engine, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.blocks.num_free == engine.blocks.num_blocks and engine.adapters.running_pins() == 0:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------- the store
def test_overwrite_of_an_org_folder_does_not_delete_the_orgs_adapters(trainer) -> None:
    """`org` is the folder of `org/a2`, not an adapter: training `org` with overwrite swapped the
    whole folder out and deleted it, org/a2 with it (a key allowed `org` but not `org/*` could
    wipe adapters it may not even use)."""
    with Client(trainer.target) as client:
        try:
            job = client.create_training_job("org", DATA, overwrite=True, **QUICK)
        except REFUSED:
            pass
        else:
            wait_done(client, job.job_id)
        assert (trainer.store / "org" / "a2" / "adapter_model.safetensors").exists()
        assert "org/a2" in {row.adapter_id for row in client.list_adapters(include_disk=True)}


def test_an_adapter_is_not_written_inside_another_adapters_folder(trainer) -> None:
    """`a1` is an adapter; `a1/evil` made a1's folder an org folder too (a later overwrite of
    `a1` would then delete `a1/evil`, and a1's folder holds files it did not ship)."""
    before = sorted(p.name for p in (trainer.store / "a1").iterdir())
    with Client(trainer.target) as client:
        try:
            job = client.create_training_job("a1/evil", DATA, **QUICK)
        except REFUSED:
            pass
        else:
            wait_done(client, job.job_id)
    assert sorted(p.name for p in (trainer.store / "a1").iterdir()) == before


# ---------------------------------------------------------------------------------- bad requests
def test_an_empty_target_module_list_is_refused_at_once(shared) -> None:
    """`,,,` selected no module: accepted, then the job failed at start with an internal
    ValueError (AdamW got an empty parameter list)."""
    with Client(shared.target) as client:
        try:
            with pytest.raises(InvalidRequest, match="target_modules"):
                client.create_training_job("nomods", DATA, target_modules=",,,", **QUICK)
        finally:
            cancel_all(client)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b', "completion": "x"}', id="deep-nesting"
        ),
        pytest.param(b'{"prompt": "a", "completion": "b", "n": ' + b"9" * 5000 + b"}", id="huge-int"),
        pytest.param(b'{"prompt": "a\\ud800", "completion": "b"}', id="lone-surrogate-prompt"),
        pytest.param(b'{"prompt": "a", "completion": "\\udfff"}', id="lone-surrogate-completion"),
        pytest.param(
            json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(), id="assistant-only"
        ),
    ],
)
def test_malformed_data_is_an_invalid_request_not_an_internal_error(shared, data) -> None:
    """Each of these reached json/the tokenizer/the chat template and came back INTERNAL."""
    with Client(shared.target) as client:
        try:
            with pytest.raises(InvalidRequest, match="training_data"):
                client.create_training_job("malformed", data, **QUICK)
        finally:
            cancel_all(client)


def test_a_line_separator_inside_a_json_string_is_valid_jsonl(shared) -> None:
    """U+2028 (and U+0085, form feed...) is legal raw inside a JSON string; str.splitlines cut
    the record there and the line was refused as 'not valid JSON'."""
    record = '{"prompt": "first\u2028second ->", "completion": " x"}\n'
    with Client(shared.target) as client:
        try:
            job = client.create_training_job("separator", (record + record).encode(), **QUICK)
            assert job.train_examples + job.eval_examples == 2
        finally:
            cancel_all(client)


def test_an_oversized_job_id_is_not_found(shared) -> None:
    """The error echoed the whole job id: a 100 kB id made trailers past gRPC's metadata limit
    and the client got RESOURCE_EXHAUSTED ('Stream removed') instead of NOT_FOUND."""
    from loraserve_client import AdapterNotFound

    with Client(shared.target) as client, pytest.raises((AdapterNotFound, InvalidRequest)):
        client.get_training_job("x" * 100_000)


# ---------------------------------------------------------------------------------- starvation, quota
@pytest.fixture
def slow_prepare(monkeypatch):
    """Data preparation that blocks until released: what a 16 MiB data set does for ~100 s."""
    import loraserve.training.manager as manager

    real, gate, entered = manager.prepare, threading.Event(), []

    def prepare(*args, **kwargs):
        entered.append(time.monotonic())
        gate.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(manager, "prepare", prepare)
    yield gate, entered
    gate.set()


def test_serving_goes_on_while_many_jobs_are_being_prepared(trainer, slow_prepare) -> None:
    """Job data was tokenized on the event loop's default executor, which also renders every
    chat request: a few concurrent CreateTrainingJob calls with big data stalled all chat
    serving (measured: 37.8 s for a 2-token chat while 8 x 2 MiB creates ran; 13 ms before)."""
    import os

    gate, _ = slow_prepare
    creates = min(32, (os.cpu_count() or 1) + 4) + 1  # more than the default executor's threads

    async def scenario() -> float:
        async with AsyncClient(trainer.target, retries=0) as client:
            pending = [
                asyncio.ensure_future(client.create_training_job(f"starve/j{i}", DATA, **LONG))
                for i in range(creates)
            ]
            try:
                await asyncio.sleep(1.0)
                started = time.perf_counter()
                await client.chat([{"role": "user", "content": "hi"}], "a1", max_new_tokens=2, timeout=15)
                return time.perf_counter() - started
            finally:
                gate.set()
                await asyncio.gather(*pending, return_exceptions=True)

    try:
        seconds = asyncio.run(scenario())
    finally:
        gate.set()
        with Client(trainer.target) as client:
            cancel_all(client)
    assert seconds < 5.0


@pytest.fixture
def keyed(store_copy, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text(key_entry_toml("lsk_acme-trainer", "acme", ["acme/*"], admin=False) + "train = true\n")
    with ServerThread(
        model=str(store_copy.base), adapters_dir=store_copy.store, api_keys_file=keys, kv_cache_bytes=2 << 20
    ) as srv:
        srv.store = store_copy.store
        yield srv


def test_the_per_tenant_quota_holds_under_concurrent_creates(keyed) -> None:
    """20 creates at once from one tenant (quota 2): the await in create must not let more in."""

    async def scenario():
        async with AsyncClient(keyed.target, api_key="lsk_acme-trainer", retries=0) as client:
            return await asyncio.gather(
                *(client.create_training_job(f"acme/q{i}", DATA, **LONG) for i in range(20)),
                return_exceptions=True,
            )

    results = asyncio.run(scenario())
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, Overloaded)]
    with Client(keyed.target, api_key="lsk_acme-trainer") as client:
        active = [j for j in client.list_training_jobs() if not j.done]
        cancel_all(client)
    assert len(accepted) == 2 and len(refused) == 18, results
    assert len(active) == 2


def test_a_tenant_at_its_quota_is_refused_before_its_data_is_tokenized(keyed, slow_prepare) -> None:
    """The quota was checked before the (long) tokenization but nothing was reserved: a tenant
    allowed 2 jobs had every one of its concurrent creates tokenize its data (~100 s of CPU and
    ~260 MiB per 16 MiB request) before all but 2 were refused."""
    gate, entered = slow_prepare

    async def scenario():
        async with AsyncClient(keyed.target, api_key="lsk_acme-trainer", retries=0) as client:
            pending = [
                asyncio.ensure_future(client.create_training_job(f"acme/r{i}", DATA, **LONG))
                for i in range(5)
            ]
            try:
                deadline = time.monotonic() + 10
                while len(entered) < 5 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                return len(entered)
            finally:
                gate.set()
                await asyncio.gather(*pending, return_exceptions=True)

    try:
        tokenizing = asyncio.run(scenario())
    finally:
        gate.set()
        with Client(keyed.target, api_key="lsk_acme-trainer") as client:
            cancel_all(client)
    assert tokenizing <= 2


# ------------------------------------------------------------------------ the base model after a job
def test_serving_of_other_adapters_is_bit_identical_after_a_job(trainer) -> None:
    """A job unpacks bitsandbytes' CPU-packed NF4 weights and they were packed again afterwards
    with re-rounded bf16 scales: after ONE job of another tenant, 9 of 40 greedy 32-token outputs
    of the base and a1/org/a2/a3 changed (one at its first token), and the drift grew with every
    job (logits max |diff| 2.4e-2 after one, 7.8e-2 after 14)."""
    with Client(trainer.target, timeout=120) as client:
        before = greedy(client)
        assert greedy(client) == before  # serving alone is deterministic
        for i in range(2):
            job = client.create_training_job(f"other{i}", DATA, **QUICK)
            assert wait_done(client, job.job_id).state == "succeeded"
        after = greedy(client)
    changed = sorted(key for key in before if before[key] != after[key])
    assert not changed, f"{len(changed)} of {len(before)} outputs changed: {changed}"


def test_a_job_that_cannot_start_gives_serving_its_layout_back(trainer, monkeypatch) -> None:
    """A job failing in its start (after the base was made trainable) left the 4-bit layers
    unpacked, so serving stayed on the slow training layout until some later job ended."""
    import loraserve.training.run as run

    layers = [
        module for module in trainer.engine.loaded.model.modules() if type(module).__name__ == "Linear4bit"
    ]
    with Client(trainer.target) as client:
        before = greedy(client)
        flags = [getattr(m, "support_avx512bf16_for_cpu", None) for m in layers]

        def broken(*args, **kwargs):
            raise RuntimeError("no memory for the job's weights")

        monkeypatch.setattr(run, "TrainableLoRA", broken)
        job = client.create_training_job("nostart", DATA, **QUICK)
        final = wait_done(client, job.job_id)
        assert final.state == "failed" and "could not start" in final.error
        client.generate("hello", "a1", max_new_tokens=2)
        assert [getattr(m, "support_avx512bf16_for_cpu", None) for m in layers] == flags
        assert not any(hasattr(m, "_loraserve_packs") for m in layers)
        assert greedy(client) == before


# ---------------------------------------------------------------------------------- what a job leaves
def test_jobs_leave_nothing_behind(trainer) -> None:
    """Succeeded, cancelled and failed jobs, with watchers that hang up: afterwards every KV
    block is free, no adapter is pinned, no watcher is registered, no tensor holds a gradient,
    and the jobs gauge agrees with the table."""
    import grpc

    from loraserve_client.api import loraserve_pb2 as pb
    from loraserve_client.api import loraserve_pb2_grpc as pb_grpc

    manager = trainer.server.services.training
    with Client(trainer.target) as client, grpc.insecure_channel(trainer.target) as channel:
        stub = pb_grpc.TrainingStub(channel)
        for i in range(3):
            done = client.create_training_job(f"leave/ok{i}", DATA, **QUICK)
            assert wait_done(client, done.job_id).state == "succeeded"
            long = client.create_training_job(f"leave/cancel{i}", DATA, **LONG)
            streams = [
                stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=long.job_id)) for _ in range(5)
            ]
            for stream in streams:
                next(stream)
            for stream in streams[:3]:
                stream.cancel()  # these hang up; the others see the job end
            client.cancel_training_job(long.job_id)
            assert client.cancel_training_job(long.job_id).job_id == long.job_id  # twice: harmless
            assert wait_done(client, long.job_id).state == "cancelled"
            assert client.cancel_training_job(long.job_id).state == "cancelled"  # after the end
            for stream in streams[3:]:
                assert [s.state for s in stream][-1] == pb.TRAINING_STATE_CANCELLED
        assert client.generate("hi", "leave/ok0", max_new_tokens=2).usage.completion_tokens == 2
        jobs = client.list_training_jobs()
    assert settled(trainer)
    deadline = time.monotonic() + 10
    while manager._watchers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager._watchers == {}
    gc.collect()
    assert not [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.grad is not None]
    gauge = {
        s: trainer.metrics.training_jobs.labels(s)._value.get() for s in ("succeeded", "cancelled", "running")
    }
    assert gauge == {
        "succeeded": sum(j.state == "succeeded" for j in jobs),
        "cancelled": sum(j.state == "cancelled" for j in jobs),
        "running": 0,
    }


def test_a_job_for_an_id_created_meanwhile_does_not_overwrite_it(trainer) -> None:
    """Someone puts an adapter of the job's id into the store while it trains: the job must not
    replace it (it was created without overwrite)."""
    with Client(trainer.target) as client:
        job = client.create_training_job("meanwhile", DATA, steps=400, batch_size=5)
        shutil.copytree(trainer.store / "a1", trainer.store / "meanwhile")
        final = wait_done(client, job.job_id)
    assert final.state == "failed" and "appeared in the store" in final.error
    assert (trainer.store / "meanwhile" / "README.md").exists()  # a1's copy, untouched


def test_drain_with_open_watchers_and_a_running_job_does_not_hang(store_copy) -> None:
    import grpc

    from loraserve_client.api import loraserve_pb2 as pb
    from loraserve_client.api import loraserve_pb2_grpc as pb_grpc

    srv = ServerThread(
        model=str(store_copy.base), adapters_dir=store_copy.store, kv_cache_bytes=2 << 20
    ).start()
    try:
        with Client(srv.target) as client:
            job = client.create_training_job("drain", DATA, **LONG)
        channel = grpc.insecure_channel(srv.target)
        stub = pb_grpc.TrainingStub(channel)
        streams = [stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job.job_id)) for _ in range(5)]
        for stream in streams:
            next(stream)
    finally:
        started = time.monotonic()
        srv.stop(grace=0.5)
        stopped = time.monotonic() - started
    assert not srv._thread.is_alive() and stopped < 30
    with pytest.raises(grpc.RpcError):
        list(streams[0])
    channel.close()


def test_refused_creates_are_not_errors_of_the_server(shared) -> None:
    """Every refused request above is answered with its trainer code, never INTERNAL."""
    with Client(shared.target) as client:
        for adapter_id, options in [
            ("..", {}),
            ("org/name/extra", {}),
            (".loraserve-training", {}),
            ("x", {"alpha": float("inf")}),
            ("x", {"learning_rate": float("nan")}),
            ("x", {"eval_fraction": float("nan")}),
            ("x", {"max_length": 2**32 - 1}),
            ("x", {"steps": 2**32 - 1}),
            ("x", {"target_modules": "all-linear,q_proj"}),
        ]:
            with pytest.raises(LoraserveError) as caught:
                client.create_training_job(adapter_id, DATA, **options)
            assert caught.value.code in ("INVALID_ARGUMENT", "ALREADY_EXISTS", "FAILED_PRECONDITION"), (
                caught.value
            )
