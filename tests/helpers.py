"""Test helpers: a toy model with PEFT adapters, an in-process server on a real port, PEFT references."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraserve.adapters.synthetic import make_peft_adapter
from loraserve.config import ServerConfig
from loraserve.toy import save_toy_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Adapters of the toy store: ids -> make_peft_adapter kwargs (ranks, targets, scaling all differ).
TOY_ADAPTERS: dict[str, dict[str, Any]] = {
    "a1": {"r": 8, "lora_alpha": 16},
    "org/a2": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    "a3": {
        "r": 6,
        "lora_alpha": 12,
        "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"],
        "rank_pattern": {"o_proj": 2},
        "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 3.0},
    },
    "a4": {"r": 2, "lora_alpha": 4, "target_modules": ["gate_proj", "v_proj"], "layers_to_transform": [1]},
    "a5": {"r": 16, "lora_alpha": 8, "target_modules": ALL_LINEAR},
    "a6": {"r": 3, "lora_alpha": 6, "target_modules": ["k_proj", "down_proj"], "use_rslora": True},
}
PROMPTS = ["the quick brown fox", "hello world", "o rato roeu a roupa", "loraserve serves", "ação e coração"]


@dataclass
class Toy:
    """Paths of the session's toy model and adapter store."""

    base: Path
    store: Path

    def adapter(self, adapter_id: str) -> Path:
        return self.store / adapter_id


def build_toy(root: Path) -> Toy:
    base = save_toy_model(
        root / "base",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        seed=0,
        # Well-conditioned: peaked logits and moderate adapters, so that float noise between
        # batched and single forward passes (~1e-6) never flips a greedy choice.
        initializer_range=0.1,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    for i, (adapter_id, kwargs) in enumerate(TOY_ADAPTERS.items()):
        make_peft_adapter(
            base, root / "store" / adapter_id, seed=100 + i, weight_std=0.05, base_model=model, **kwargs
        )
    return Toy(base, root / "store")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_toy(toy: Toy, port: int, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`loraserve serve` on the toy model and store in a child process, on `port`, with more
    `flags`; its stdout and stderr are piped as text."""
    command = ["serve", "--model", str(toy.base), "--adapters-dir", str(toy.store), "--port", str(port)]
    return subprocess.Popen(
        [sys.executable, "-m", "loraserve.cli", *command, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


class ServerThread:
    """A LoraServer on a real port, run by an event loop in a background thread."""

    def __init__(self, **config: Any) -> None:
        config.setdefault("port", 0)
        config.setdefault("metrics_port", 0)
        config.setdefault("device", "cpu")
        self.config = ServerConfig(**config)
        self.server: Any = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-server")
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from loraserve.app import LoraServer

        self._stop = asyncio.Event()
        try:
            self.server = LoraServer(self.config)
            await self.server.start()
            await self.server.ready.wait()
        except BaseException as error:  # noqa: BLE001 - reported to the test
            self.error = error
        finally:
            self._started.set()
        if self.error is None:
            await self._stop.wait()
            await self.server.drain(self._grace)

    def start(self, timeout: float = 120.0) -> ServerThread:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("test server did not start")
        if self.error is not None:
            raise self.error
        if self.server.failed is not None:
            raise self.server.failed
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def engine(self) -> Any:
        return self.server.engine

    @property
    def metrics(self) -> Any:
        return self.server.metrics

    def call(self, coroutine: Any, timeout: float = 60.0) -> Any:
        """Runs a coroutine on the server's loop (e.g. drain) and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        self._grace = grace
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    _grace = 0.0

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def settle(srv: ServerThread, timeout: float = 120) -> None:
    """Waits for the engine to end every request (cancellations included) and for the running
    gauge to say so, then checks that nothing is held: KV blocks, queue places, adapter pins."""
    engine = srv.engine
    running = srv.metrics.registry.get_sample_value
    deadline = time.monotonic() + timeout
    # The gauge is set after the step that ended the last request, which may still be finishing
    # on the engine thread when its client has its answer.
    while (engine.in_flight or running("loraserve_requests_running")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.in_flight == 0
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.scheduler.running and engine.scheduler.num_waiting == 0
    for row in engine.adapters.describe():
        assert row.in_flight == 0, row
    # Pins: each sequence in the running batch holds its adapter's slot.
    assert engine.adapters.running_pins() == 0
    assert running("loraserve_requests_running") == 0


@contextmanager
def slow_server(**config: Any) -> Iterator[ServerThread]:
    """A test server given the time the real model takes to load on a busy machine (15 min)."""
    server = ServerThread(**config).start(timeout=900)
    try:
        yield server
    finally:
        server.stop()


def gate_model_load(monkeypatch: Any) -> threading.Event:
    """Makes the next server's model load wait until the returned event is set (tests set it in
    a finally), so that they can look at a server that is still starting."""
    from loraserve import model_loader

    gate = threading.Event()
    real_load = model_loader.load_base_model

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        gate.wait(300)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(model_loader, "load_base_model", slow_load)
    return gate


class PeftReference:
    """PEFT's own outputs on the same quantized base: the ground truth for our server."""

    def __init__(self, toy: Toy, quantization: str = "nf4") -> None:
        from peft import PeftModel

        from loraserve.model_loader import load_base_model

        loaded = load_base_model(str(toy.base), quantization, "cpu", "float32")
        self.tokenizer = loaded.tokenizer
        names = list(TOY_ADAPTERS)
        self.model = PeftModel.from_pretrained(
            loaded.model, str(toy.adapter(names[0])), adapter_name=names[0]
        )
        for name in names[1:]:
            self.model.load_adapter(str(toy.adapter(name)), adapter_name=name)
        self.model.eval()
        self._cache: dict[tuple, list[int]] = {}

    @torch.inference_mode()
    def generate(
        self, prompt_ids: list[int], adapter: str, max_new_tokens: int, ignore_eos: bool = False
    ) -> list[int]:
        """PEFT's greedy tokens for one prompt (stopping at EOS like the server, unless ignore_eos)."""
        key = (tuple(prompt_ids), adapter, max_new_tokens, ignore_eos)
        if key not in self._cache:
            ids = torch.tensor([prompt_ids])
            kwargs = {
                "max_new_tokens": max_new_tokens,
                "do_sample": False,
                "pad_token_id": self.tokenizer.pad_token_id,
            }
            if ignore_eos:
                kwargs["min_new_tokens"] = max_new_tokens
            if adapter:
                self.model.set_adapter(adapter)
                out = self.model.generate(input_ids=ids, **kwargs)
            else:
                with self.model.disable_adapter():
                    out = self.model.generate(input_ids=ids, **kwargs)
            self._cache[key] = out[0, len(prompt_ids) :].tolist()
        return self._cache[key]

    @torch.inference_mode()
    def logits(self, prompt_ids: list[int], adapter: str) -> torch.Tensor:
        ids = torch.tensor([prompt_ids])
        if adapter:
            self.model.set_adapter(adapter)
            return self.model(input_ids=ids).logits[0].float()
        with self.model.disable_adapter():
            return self.model(input_ids=ids).logits[0].float()
