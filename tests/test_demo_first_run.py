"""The first run of `loraserve serve` with no --model, end to end on the real model: it serves
SmolLM2 at once, answers UNAVAILABLE for demo adapters still in training (saying when they
will be ready), trains them in a child process and hot-loads each one the moment it is written.

The build is shrunk for the test (2 steps and 2 held-out examples per adapter, through the
demo's environment variables) in a fresh cache dir; the GGUF conversion is shared with the
user cache, as a second start of the server would find it.
"""

from __future__ import annotations

import time

import pytest

from loraserve.demo.background import DemoTraining
from loraserve.demo.options import default_cache_dir
from loraserve.demo.status import READY, read_status
from loraserve.demo.tenants import TENANT_IDS, tenants_build
from loraserve.gguf import convert, packaged_model
from loraserve_client import Client
from loraserve_client.errors import Unavailable
from tests.helpers import slow_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    converted = convert(packaged_model(), default_cache_dir())  # the user cache's, made once
    cache = tmp_path / "cache"
    (cache / "gguf").mkdir(parents=True)
    (cache / "gguf" / converted.name).symlink_to(converted)
    monkeypatch.setenv("LORASERVE_CACHE_DIR", str(cache))
    monkeypatch.setenv("LORASERVE_DEMO_STEPS", "2")
    monkeypatch.setenv("LORASERVE_DEMO_HELD_OUT", "2")
    return cache


def test_first_run_serves_at_once_and_hot_loads_each_adapter_when_trained(
    fresh_cache, tmp_path, monkeypatch
) -> None:
    # The trainer child starts only once the test opens this gate, so that the adapters cannot
    # be ready before the test has asked for one, however fast the child or slow the test.
    gate = tmp_path / "start-training"
    real_start = DemoTraining.start

    def gated_start(self: DemoTraining) -> None:
        wait = 'while [ ! -e "$0" ]; do sleep 0.1; done; exec "$@"'
        # exec: the waiting shell becomes the trainer (training.process is the trainer's own); a
        # gate never opened (a failed check above) leaves it to the server's stop, which ends it.
        self.command = ["sh", "-c", wait, str(gate), *self.command]
        real_start(self)

    monkeypatch.setattr(DemoTraining, "start", gated_start)
    build = tenants_build(fresh_cache)
    with slow_server(model=None) as server:
        training = server.server.demo_training
        assert training is not None and training.missing == list(TENANT_IDS)
        with Client(server.target, retries=0) as client:
            assert client.model_info().model == "SmolLM2-135M-Instruct.Q4_1"
            # The last adapter cannot be ready yet: the trainer has not even started.
            with pytest.raises(Unavailable) as pending:
                client.chat([("user", "How do I load an adapter?")], "support-bot", max_new_tokens=8)
            message = pending.value.details
            assert "adapter 'support-bot' is still training" in message and "ready in" in message
            assert pending.value.code == "UNAVAILABLE"
            gate.touch()
            # The base model answers while the adapters train.
            answer = client.chat([("user", "What is the capital of France?")], max_new_tokens=24)
            assert "Paris" in answer.text
            # Each adapter is loaded onto the device by the server as soon as the child wrote it.
            deadline = time.monotonic() + 1200
            while len(training.loaded) < len(TENANT_IDS) and time.monotonic() < deadline:
                assert training.process.poll() in (None, 0), "the demo trainer failed"
                time.sleep(1)
            assert training.loaded == list(TENANT_IDS)  # in training order
            device = {a.adapter_id: a.state for a in client.list_adapters()}
            assert all(device.get(a) == "device" for a in TENANT_IDS), device
            for adapter_id in TENANT_IDS:
                assert client.chat([("user", "o gato preto")], adapter_id, max_new_tokens=4).usage
            # The child scores the last adapter after writing it, then exits.
            assert training.process.wait(timeout=600) == 0
        status = read_status(build.status_file)
        assert status is not None and all(p.state == READY for p in status.adapters.values())
        assert set(build.report()["adapters"]) == set(TENANT_IDS) and build.missing() == []
    # A later start finds everything built and trains nothing.
    with slow_server(model=None) as server:
        assert server.server.demo_training is None
