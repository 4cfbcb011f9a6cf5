"""An engine on the toy model, driven step by step from the test (no thread, no gRPC)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.sequence import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Sequence,
    SequenceOutput,
    StoppingCriteria,
)
from loraserve.model_loader import load_base_model


@dataclass
class Outcome:
    """Everything the engine sent to one request's sink."""

    outputs: list[SequenceOutput] = field(default_factory=list)

    def __call__(self, output: SequenceOutput) -> None:
        self.outputs.append(output)

    @property
    def done(self) -> bool:
        return bool(self.outputs) and self.outputs[-1].done

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.outputs[-1].finish_reason if self.done else None


class Driver:
    """Submits requests and steps the engine until they finish."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.count = 0

    def submit(
        self,
        prompt: str | list[int],
        adapter: str = "",
        max_new_tokens: int = 8,
        tenant: str = "",
        sampling: SamplingParams | None = None,
        **stopping,
    ) -> tuple[Sequence, Outcome]:
        ids = prompt if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"]
        self.count += 1
        request = GenerationRequest(
            f"t{self.count}",
            ids,
            sampling or SamplingParams(),
            StoppingCriteria(max_new_tokens=max_new_tokens, **stopping),
            adapter,
            tenant,
        )
        outcome = Outcome()
        return self.engine.submit(request, outcome), outcome

    def run(self, outcomes: list[Outcome], timeout: float = 120.0, on_step=None) -> None:
        deadline = time.monotonic() + timeout
        while not all(o.done for o in outcomes):
            if time.monotonic() > deadline:
                raise TimeoutError("engine did not finish the requests")
            if not self.engine.step():
                time.sleep(0.001)  # an adapter is loading on a worker thread
            elif on_step is not None:
                on_step()

    def resident(self, *adapter_ids: str, timeout: float = 120.0) -> None:
        """Loads adapters into device slots before a test whose step-by-step assertions must not
        depend on when a reader thread finishes (a request whose adapter is still being read stays
        queued, so it would join the batch a timing-dependent number of steps late)."""
        futures = [self.engine.adapters.load(adapter_id) for adapter_id in adapter_ids]
        deadline = time.monotonic() + timeout
        while not all(future.done() for future in futures):
            if time.monotonic() > deadline:
                raise TimeoutError(f"adapters {adapter_ids} were not loaded")
            if not self.engine.step():  # its housekeeping places the loaded adapters
                time.sleep(0.001)
        for adapter_id, future in zip(adapter_ids, futures):
            future.result()  # raises the adapter's error, if it was refused
            assert self.engine.adapters.describe_one(adapter_id).tier == "device", adapter_id

    def generate(self, prompt: str, adapter: str = "", max_new_tokens: int = 8, **kwargs) -> Outcome:
        _, outcome = self.submit(prompt, adapter, max_new_tokens, **kwargs)
        self.run([outcome])
        return outcome


@pytest.fixture
def make_driver(toy):
    engines: list[Engine] = []

    def make(**config) -> Driver:
        loaded = load_base_model(str(toy.base), config.pop("quantization", "nf4"), "cpu", "float32")
        config.setdefault("adapters_dir", toy.store)
        config.setdefault("max_loaded_adapters", 4)
        config.setdefault("kv_cache_bytes", 2 << 20)
        engine = Engine(loaded, EngineConfig(**config))
        engines.append(engine)
        return Driver(engine)

    yield make
    for engine in engines:
        engine.shutdown()
