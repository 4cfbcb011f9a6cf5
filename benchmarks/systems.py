"""The systems a benchmark drives with one workload, each returning per-request timing records.

- engine: our engine in-process (its own step thread), requests submitted as they arrive;
- grpc: the same through a gRPC server (in-process on a free port, or --target), via AsyncClient;
- peft-batch: PEFT `generate(adapter_names=...)` on the same NF4 base, static batches of
  whatever has arrived (at most `batch_size`), each batch running to its longest request;
- peft-serial: PEFT one request at a time with `set_adapter`;
- bare-loop: a bare batched forward loop of the base model (HF cache, greedy), the engine's
  overhead reference.
All use greedy decoding with EOS ignored, so every system generates the same token counts.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from loraserve.benchmarks.workload import BenchRequest
from loraserve.engine.sequence import GenerationRequest, StoppingCriteria
from loraserve.ids import BASE


@dataclass
class Record:
    """What one request experienced (perf_counter seconds)."""

    index: int
    adapter: str
    arrival: float = 0.0
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None
    error: str | None = None
    wanted: int = 0

    @property
    def tokens(self) -> int:
        return len(self.token_times)


Progress = Callable[[int], None]


def _closed_or_open(
    requests: list[BenchRequest],
    workload: str,
    concurrency: int,
    start_one: Callable[[BenchRequest, threading.Event], Record],
    progress: Progress,
) -> list[Record]:
    """Drives `start_one` (which returns at once and sets the event when the request ends)."""
    records: list[Record] = []
    lock = threading.Lock()
    if workload == "closed":
        pending: queue.Queue[BenchRequest] = queue.Queue()
        for request in requests:
            pending.put(request)

        def client() -> None:
            while True:
                try:
                    request = pending.get_nowait()
                except queue.Empty:
                    return
                done = threading.Event()
                record = start_one(request, done)
                done.wait()
                with lock:
                    records.append(record)
                progress(1)

        threads = [threading.Thread(target=client) for _ in range(min(concurrency, len(requests)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return records
    started = time.perf_counter()
    events = []
    for request in sorted(requests, key=lambda r: r.arrival):
        delay = started + request.arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        done = threading.Event()
        records.append(start_one(request, done))
        events.append(done)
    for done in events:
        done.wait()
        progress(1)
    return records


# ----------------------------------------------------------------------------------- engine
def run_engine(
    engine: Any,
    requests: list[BenchRequest],
    workload: str,
    concurrency: int,
    progress: Progress = lambda n: None,
) -> list[Record]:
    def start_one(request: BenchRequest, done: threading.Event) -> Record:
        record = Record(request.index, request.adapter, wanted=request.max_new_tokens)

        def sink(output: Any) -> None:
            now = time.perf_counter()
            record.token_times.extend([now] * len(output.token_ids))
            if output.done:
                record.finish = now
                if output.error is not None:
                    record.error = f"{type(output.error).__name__}: {output.error}"
                done.set()

        record.arrival = time.perf_counter()
        generation = GenerationRequest(
            f"bench-{request.index}",
            request.prompt_ids,
            stopping=StoppingCriteria(
                max_new_tokens=request.max_new_tokens, ignore_eos=True, max_time_seconds=3600
            ),
            adapter_id=request.adapter,
        )
        try:
            engine.submit(generation, sink)
        except Exception as error:  # noqa: BLE001 - counted as an error of this request
            record.error = f"{type(error).__name__}: {error}"
            record.finish = time.perf_counter()
            done.set()
        return record

    return _closed_or_open(requests, workload, concurrency, start_one, progress)


# ----------------------------------------------------------------------------------- grpc
def run_grpc(
    target: str,
    requests: list[BenchRequest],
    workload: str,
    concurrency: int,
    progress: Progress = lambda n: None,
) -> list[Record]:
    from loraserve_client import AsyncClient

    async def one(client: AsyncClient, request: BenchRequest) -> Record:
        record = Record(
            request.index, request.adapter, arrival=time.perf_counter(), wanted=request.max_new_tokens
        )
        try:
            # The prompt goes as text and is tokenized again by the server (lengths may differ by a token).
            async for chunk in client.generate_stream(
                request.prompt_text,
                request.adapter,
                timeout=3600,
                max_new_tokens=request.max_new_tokens,
                ignore_eos=True,
            ):
                now = time.perf_counter()
                record.token_times.extend([now] * len(chunk.token_ids))
        except Exception as error:  # noqa: BLE001 - counted as an error of this request
            record.error = f"{type(error).__name__}: {error}"
        record.finish = time.perf_counter()
        progress(1)
        return record

    async def main() -> list[Record]:
        async with AsyncClient(target, retries=0) as client:
            if workload == "closed":
                pending = list(requests)
                records: list[Record] = []

                async def worker() -> None:
                    while pending:
                        records.append(await one(client, pending.pop(0)))

                await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
                return records
            started = time.perf_counter()
            tasks = []
            for request in sorted(requests, key=lambda r: r.arrival):
                delay = started + request.arrival - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(client, request)))
            return list(await asyncio.gather(*tasks))

    return asyncio.run(main())


# ----------------------------------------------------------------------------------- PEFT
def left_padded(batch: list[BenchRequest], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids [B, longest] padded on the left, and their attention mask (static batching)."""
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, request in enumerate(batch):
        ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
        mask[row, width - len(request.prompt_ids) :] = 1
    return ids, mask


class StepClock:
    """A transformers StoppingCriteria that only records when each decoding step ends."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class PeftPeer:
    """PEFT on the same quantized base, with every adapter the workload uses loaded."""

    def __init__(
        self, model_dir: str, store: Any, adapter_ids: list[str], quantization: str, device: str
    ) -> None:
        from peft import PeftModel

        from loraserve.model_loader import load_base_model

        loaded = load_base_model(model_dir, quantization, device, "auto")
        self.device = loaded.device
        self.pad_id = loaded.tokenizer.pad_token_id
        self.names = {a: a.replace("/", "__") for a in adapter_ids}  # PEFT adapter names cannot hold "/"
        self.load_seconds = 0.0
        started = time.perf_counter()
        first, *rest = adapter_ids
        self.model = PeftModel.from_pretrained(
            loaded.model, str(store / first), adapter_name=self.names[first]
        )
        for adapter in rest:
            self.model.load_adapter(str(store / adapter), adapter_name=self.names[adapter])
        self.load_seconds = time.perf_counter() - started
        self.model.eval()

    def _generate(self, batch: list[BenchRequest], mixed: bool) -> StepClock:
        ids, mask = left_padded(batch, self.pad_id)
        longest = max(r.max_new_tokens for r in batch)
        clock = StepClock()
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "max_new_tokens": longest,
            "min_new_tokens": longest,
            "do_sample": False,
            "pad_token_id": self.pad_id,
            "stopping_criteria": [clock],
        }
        with torch.inference_mode():
            if mixed:
                names = [self.names.get(r.adapter, BASE) if r.adapter else BASE for r in batch]
                self.model.generate(adapter_names=names, **kwargs)
            elif batch[0].adapter:
                self.model.set_adapter(self.names[batch[0].adapter])
                self.model.generate(**kwargs)
            else:
                with self.model.disable_adapter():
                    self.model.generate(**kwargs)
        return clock

    def run_batched(
        self,
        requests: list[BenchRequest],
        workload: str,
        batch_size: int,
        progress: Progress = lambda n: None,
    ) -> list[Record]:
        """Static batches: whatever has arrived (up to batch_size) runs to its longest request."""
        pending = sorted(requests, key=lambda r: r.arrival)
        started = time.perf_counter()
        records = []
        while pending:
            now = time.perf_counter() - started
            if workload == "poisson" and pending[0].arrival > now:
                time.sleep(pending[0].arrival - now)
                now = time.perf_counter() - started
            arrived = [r for r in pending if workload == "closed" or r.arrival <= now]
            batch = arrived[:batch_size]
            pending = [r for r in pending if r not in batch]
            clock = self._generate(batch, mixed=True)
            for request in batch:
                arrival = started + (0.0 if workload == "closed" else request.arrival)
                useful = clock.times[: request.max_new_tokens]
                records.append(
                    Record(
                        request.index,
                        request.adapter,
                        arrival,
                        useful,
                        useful[-1],
                        wanted=request.max_new_tokens,
                    )
                )
            progress(len(batch))
        return records

    def run_serial(
        self, requests: list[BenchRequest], workload: str, progress: Progress = lambda n: None
    ) -> list[Record]:
        """One request at a time, switching adapters with set_adapter."""
        started = time.perf_counter()
        records = []
        for request in sorted(requests, key=lambda r: r.arrival):
            if workload == "poisson":
                delay = started + request.arrival - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            arrival = started + (0.0 if workload == "closed" else request.arrival)
            clock = self._generate([request], mixed=False)
            records.append(
                Record(
                    request.index,
                    request.adapter,
                    arrival,
                    clock.times,
                    clock.times[-1],
                    wanted=request.max_new_tokens,
                )
            )
            progress(1)
        return records


# ----------------------------------------------------------------------------------- bare loop
def run_bare_loop(
    model_dir: str,
    requests: list[BenchRequest],
    quantization: str,
    device: str,
    batch_size: int,
    progress: Progress = lambda n: None,
) -> list[Record]:
    """The base model alone: prefill a static batch, then one forward per token with HF's cache."""
    from loraserve.model_loader import load_base_model

    loaded = load_base_model(model_dir, quantization, device, "auto")
    model = loaded.model
    records = []
    started = time.perf_counter()
    for offset in range(0, len(requests), batch_size):
        batch = requests[offset : offset + batch_size]
        ids, mask = left_padded(batch, loaded.tokenizer.pad_token_id)
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        times = []
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter())
            cache = out.past_key_values
            for _ in range(max(r.max_new_tokens for r in batch) - 1):
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                cache = out.past_key_values
                times.append(time.perf_counter())
        for request in batch:
            useful = times[: request.max_new_tokens]
            records.append(
                Record(request.index, "", started, useful, useful[-1], wanted=request.max_new_tokens)
            )
        progress(len(batch))
    return records
