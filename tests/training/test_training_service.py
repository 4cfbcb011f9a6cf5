"""The Training service end to end over a real port: train on the resident toy base, serve.

A job memorises six prompt->completion pairs; progress is watched; the adapter is then served
with no LoadAdapter call and its greedy outputs equal PEFT's on the written folder. Around it:
cancel, bad data, duplicate ids, rights, limits, faults and a restart with a running job.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch

from loraserve.auth import key_entry_toml
from loraserve.training.run import TrainingRun, make_base_trainable, restore_inference_layout
from loraserve_client import (
    AlreadyExists,
    AsyncClient,
    Client,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
)
from tests.helpers import ServerThread

PAIRS = [
    ("red", "apple"),
    ("blue", "sky"),
    ("green", "grass"),
    ("yellow", "sun"),
    ("white", "snow"),
    ("black", "night"),
]
DATA = "\n".join(json.dumps({"prompt": f"color {c} ->", "completion": f" {w}"}) for c, w in PAIRS).encode()
MEMORISE = {"steps": 80, "batch_size": 6, "learning_rate": 1e-2, "eval_fraction": 0.0}
LONG = {"steps": 100_000, "batch_size": 6}


def wait_for(client: Client, job_id: str, predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_training_job(job_id)
        if predicate(job):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached the condition: {job}")


def test_a_job_memorises_six_pairs_and_is_served_while_others_are(trainer, tmp_path) -> None:
    async def scenario():
        async with AsyncClient(trainer.target, retries=0) as client:
            job = await client.create_training_job("colors", DATA, **MEMORISE)
            assert job.state == "queued" and job.total_steps == 80 and job.train_examples == 6

            async def serve_others() -> list[tuple[str, int]]:
                seen = []
                while True:
                    state = (await client.get_training_job(job.job_id)).state
                    if state in ("succeeded", "failed", "cancelled"):
                        return seen
                    result = await client.generate("hello world", "a1", max_new_tokens=4, ignore_eos=True)
                    seen.append((state, result.usage.completion_tokens))

            serving = asyncio.create_task(serve_others())
            updates = [update async for update in client.watch_training_job(job.job_id)]
            return job, updates, await serving

    _, updates, served = asyncio.run(scenario())
    final = updates[-1]
    assert final.state == "succeeded", final.error
    steps = sorted({u.step for u in updates if u.state == "running"})
    assert len(steps) >= 5 and steps[-1] >= 70  # progress seen at several steps
    assert updates[0].state in ("queued", "running") and final.step == 80 and final.finished_unix_seconds > 0
    losses = [u.loss for u in updates if u.step > 0]
    assert losses[-1] < losses[0] / 3
    assert any(state == "running" for state, _ in served), served  # serving went on while it trained
    assert all(tokens == 4 for _, tokens in served)

    with Client(trainer.target) as client:
        listed = {row.adapter_id: row for row in client.list_adapters()}
        assert "colors" in listed  # registered: served with no LoadAdapter call
        answers = {
            c: client.generate(f"color {c} ->", "colors", max_new_tokens=8).text.strip() for c, _ in PAIRS
        }
    assert answers == {c: w for c, w in PAIRS}

    folder = trainer.store / "colors"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loraserve_training.json",
    ]
    metadata = json.loads((folder / "loraserve_training.json").read_text())
    assert metadata["steps"] == 80 and len(metadata["loss_curve"]) == 80
    metrics = trainer.metrics
    assert metrics.training_jobs.labels("succeeded")._value.get() == 1
    assert metrics.training_steps._value.get() == 80
    assert metrics.training_tokens._value.get() > 80 * 6 * 5


def test_the_served_adapter_equals_peft_on_the_written_folder(trainer) -> None:
    from peft import PeftModel

    from loraserve.model_loader import load_base_model

    with Client(trainer.target) as client:
        job = client.create_training_job("colors", DATA, steps=30, batch_size=6, learning_rate=1e-2)
        job = wait_for(client, job.job_id, lambda j: j.done)
        assert job.state == "succeeded", job.error
        served = {c: client.generate(f"color {c} ->", "colors", max_new_tokens=8).token_ids for c, _ in PAIRS}
    # The server's base went through what a job does to it: served (bitsandbytes may pack its CPU
    # weights), made trainable (unpacked), its inference layout restored once no job was left.
    loaded = load_base_model(str(trainer.config.model), "nf4", "cpu", "float32")
    with torch.inference_mode():
        loaded.model(torch.tensor([[1, 2, 3]]))
    make_base_trainable(loaded.model)
    restore_inference_layout(loaded.model)
    model = PeftModel.from_pretrained(loaded.model, str(trainer.store / "colors")).eval()
    for color, _ in PAIRS:
        ids = loaded.tokenizer(f"color {color} ->")["input_ids"]
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=loaded.tokenizer.pad_token_id,
            )
        assert out[0, len(ids) :].tolist() == served[color], color  # both stop at EOS


def test_cancel_mid_job_leaves_nothing_in_the_store(trainer) -> None:
    with Client(trainer.target) as client:
        job = client.create_training_job("cancelled", DATA, **LONG)
        wait_for(client, job.job_id, lambda j: j.step >= 3)
        client.cancel_training_job(job.job_id)
        final = wait_for(client, job.job_id, lambda j: j.done)
        assert final.state == "cancelled" and 3 <= final.step < LONG["steps"]
        assert client.cancel_training_job(job.job_id).state == "cancelled"  # idempotent
        # a queued job behind a running one is cancelled at once
        running = client.create_training_job("first", DATA, **LONG)
        queued = client.create_training_job("second", DATA, **LONG)
        assert client.cancel_training_job(queued.job_id).state == "cancelled"
        client.cancel_training_job(running.job_id)
        wait_for(client, running.job_id, lambda j: j.done)
        assert client.generate("hello", "a1", max_new_tokens=3).usage.completion_tokens == 3
    names = {p.name for p in trainer.store.iterdir()}
    assert not names & {"cancelled", "first", "second"}
    assert not [p for p in trainer.store.iterdir() if p.name.startswith(".training-")]


@pytest.mark.parametrize(
    ("data", "options", "message"),
    [
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n', {}, "training_data:2: not valid JSON"),
        (b'{"prompt": "a"}\n', {}, "training_data:1: missing field 'completion'"),
        (b"", {}, "training_data is empty"),
        (b"\xff\xfe", {}, "training_data: not UTF-8"),
        (DATA, {"rank": 64}, "options.rank must be in [1, 16]"),
        (DATA, {"learning_rate": 5.0}, "options.learning_rate"),
        (DATA, {"eval_fraction": 0.9}, "options.eval_fraction"),
        (DATA, {"target_modules": "q_proj,lm_head"}, "lm_head not adapted by this server"),
        (DATA, {"max_length": 2}, "no training example has completion tokens within options.max_length"),
    ],
)
def test_bad_requests_are_refused_at_once(server, data, options, message) -> None:
    with Client(server.target) as client:
        with pytest.raises(InvalidRequest) as caught:
            client.create_training_job("never", data, **options)
        assert message in caught.value.details
        assert not any(job.adapter_id == "never" for job in client.list_training_jobs())


def test_data_size_and_queue_limits(store_copy) -> None:
    with (
        ServerThread(
            model=str(store_copy.base),
            adapters_dir=store_copy.store,
            kv_cache_bytes=2 << 20,
            training_max_data_bytes=len(DATA) + 10,
            training_max_queued_jobs=1,
        ) as srv,
        Client(srv.target) as client,
    ):
        with pytest.raises(InvalidRequest, match=f"over the server's limit of {len(DATA) + 10}"):
            client.create_training_job("big", DATA + DATA)
        job = client.create_training_job("first", DATA, **LONG)
        with pytest.raises(Overloaded, match="the training queue is full"):
            client.create_training_job("second", DATA, **LONG)
        client.cancel_training_job(job.job_id)
        wait_for(client, job.job_id, lambda j: j.done)


def test_duplicate_ids_and_overwrite(trainer) -> None:
    with Client(trainer.target) as client:
        with pytest.raises(AlreadyExists, match="already exists in the store"):
            client.create_training_job("a1", DATA)
        job = client.create_training_job("busy", DATA, **LONG)
        with pytest.raises(AlreadyExists, match=f"already being trained by job {job.job_id}"):
            client.create_training_job("busy", DATA, **LONG, overwrite=True)
        client.cancel_training_job(job.job_id)
        wait_for(client, job.job_id, lambda x: x.done)
        # overwrite replaces an adapter in the store, and the new weights are served
        before = client.generate("color red ->", "a1", max_new_tokens=6, ignore_eos=True).token_ids
        done = wait_for(
            client,
            client.create_training_job("a1", DATA, overwrite=True, **MEMORISE).job_id,
            lambda x: x.done,
        )
        assert done.state == "succeeded", done.error
        assert client.generate("color red ->", "a1", max_new_tokens=6).text.strip() == "apple"
        assert before != client.generate("color red ->", "a1", max_new_tokens=6, ignore_eos=True).token_ids


TRAINER, TENANT, READER = "lsk_trainer-key", "lsk_tenant-key", "lsk_reader-key"


def test_rights(store_copy, tmp_path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        key_entry_toml(TRAINER, "acme", ["acme/*"], admin=False)
        + "train = true\n\n"
        + key_entry_toml(TENANT, "acme", ["acme/*"], admin=False)
        + "\n"
        + key_entry_toml(READER, "other", ["other/*"], admin=False)
    )
    with ServerThread(
        model=str(store_copy.base), adapters_dir=store_copy.store, api_keys_file=keys, kv_cache_bytes=2 << 20
    ) as srv:
        with (
            Client(srv.target, api_key=TENANT) as client,
            pytest.raises(PermissionDenied, match="may not train"),
        ):
            client.create_training_job("acme/bot", DATA)
        with Client(srv.target, api_key=TRAINER) as client:
            with pytest.raises(PermissionDenied, match="may not use adapter 'other/bot'"):
                client.create_training_job("other/bot", DATA)
            job = client.create_training_job("acme/bot", DATA, **LONG)
            queued = client.create_training_job("acme/bot2", DATA, **LONG)
            with pytest.raises(Overloaded, match="tenant 'acme' already has 2 training job"):
                client.create_training_job("acme/bot3", DATA, **LONG)
            client.cancel_training_job(queued.job_id)
        with Client(srv.target, api_key=TENANT) as client:
            assert client.get_training_job(job.job_id).adapter_id == "acme/bot"  # may see, not cancel
            with pytest.raises(PermissionDenied):
                client.cancel_training_job(job.job_id)
        with Client(srv.target, api_key=READER) as client:
            assert client.list_training_jobs() == []
            with pytest.raises(PermissionDenied):
                client.get_training_job(job.job_id)
        with Client(srv.target, api_key=TRAINER) as client:
            client.cancel_training_job(job.job_id)
            assert wait_for(client, job.job_id, lambda j: j.done).state == "cancelled"


def test_a_diverging_job_fails_alone_and_writes_nothing(trainer, monkeypatch) -> None:
    real = TrainingRun._loss_sum

    def diverging(self, ids, labels, mask):
        loss = real(self, ids, labels, mask)
        return loss * float("nan") if self.step >= 2 else loss

    monkeypatch.setattr(TrainingRun, "_loss_sum", diverging)
    with Client(trainer.target) as client:
        job = client.create_training_job("diverges", DATA, **LONG)
        final = wait_for(client, job.job_id, lambda j: j.done)
        assert final.state == "failed" and "training diverged at step 3" in final.error
        assert client.generate("hello", "a1", max_new_tokens=3).usage.completion_tokens == 3
    assert not (trainer.store / "diverges").exists()


def test_a_job_past_the_time_limit_fails(store_copy) -> None:
    with (
        ServerThread(
            model=str(store_copy.base),
            adapters_dir=store_copy.store,
            kv_cache_bytes=2 << 20,
            training_max_seconds=0.5,
        ) as srv,
        Client(srv.target) as client,
    ):
        job = client.create_training_job("slow", DATA, **LONG)
        final = wait_for(client, job.job_id, lambda j: j.done)
        assert final.state == "failed" and "training time limit of 0.5 s" in final.error
    assert not (store_copy.store / "slow").exists()


def test_a_restart_reports_the_running_job_interrupted(store_copy, tmp_path) -> None:
    config = {
        "model": str(store_copy.base),
        "adapters_dir": store_copy.store,
        "kv_cache_bytes": 2 << 20,
        "training_state_dir": tmp_path / "state",
    }
    with ServerThread(**config) as srv, Client(srv.target) as client:
        running = client.create_training_job("restart/running", DATA, **LONG)
        wait_for(client, running.job_id, lambda j: j.step >= 1)
        done = client.create_training_job("restart/done", DATA, steps=2)  # queued behind it
    assert json.loads((tmp_path / "state" / "jobs.json").read_text())["jobs"][0]["state"] == "running"
    with ServerThread(**config) as srv, Client(srv.target) as client:
        jobs = {job.job_id: job for job in client.list_training_jobs()}
        assert jobs[running.job_id].state == "failed"
        assert "interrupted by restart" in jobs[running.job_id].error
        assert "while the job was training" in jobs[running.job_id].error
        assert jobs[done.job_id].state == "failed" and "while the job was queued" in jobs[done.job_id].error
    assert not (store_copy.store / "restart").exists()


def test_training_is_off_without_a_share_or_a_store(toy) -> None:
    from loraserve_client import AdapterRejected

    with (
        ServerThread(model=str(toy.base), kv_cache_bytes=2 << 20) as srv,
        Client(srv.target) as client,
        pytest.raises(AdapterRejected, match="needs an adapter store"),
    ):
        client.create_training_job("x", DATA)
    with (
        ServerThread(
            model=str(toy.base), adapters_dir=toy.store, kv_cache_bytes=2 << 20, training_share=0
        ) as srv,
        Client(srv.target) as client,
        pytest.raises(AdapterRejected, match="training is disabled"),
    ):
        client.create_training_job("x", DATA)


def test_train_target_cli_trains_on_the_server(trainer, tmp_path, capsys) -> None:
    from loraserve.cli import main

    data = tmp_path / "colors.jsonl"
    data.write_bytes(DATA)
    code = main(
        [
            "train",
            "--target",
            trainer.target,
            "--data",
            str(data),
            "--adapter-id",
            "cli/colors",
            "--steps",
            "80",
            "--batch-size",
            "6",
            "--lr",
            "0.01",
            "--eval-fraction",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "cli/colors: succeeded, 80/80 steps" in out
    with Client(trainer.target) as client:
        assert client.generate("color blue ->", "cli/colors", max_new_tokens=8).text.strip() == "sky"


def test_job_table_survives_for_listing(trainer) -> None:
    with Client(trainer.target) as client:
        first = client.create_training_job("t1", DATA, steps=2)
        wait_for(client, first.job_id, lambda j: j.done)
        second = client.create_training_job("t2", DATA, steps=2)
        wait_for(client, second.job_id, lambda j: j.done)
        listed = [job.job_id for job in client.list_training_jobs()]
    assert listed[:2] == [second.job_id, first.job_id]  # newest first
    saved = json.loads((Path(trainer.store) / ".loraserve-training" / "jobs.json").read_text())
    assert [j["state"] for j in saved["jobs"]] == ["succeeded", "succeeded"]
