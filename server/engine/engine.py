"""The engine: one step loop serving many requests on many adapters per forward pass.

    schedule -> activate adapters -> forward -> sample -> update

runs on its own thread so the asyncio gRPC server never blocks on model compute. Callers
`submit` a GenerationRequest with a sink; after each step the sink receives a
SequenceOutput with the new text, and a last one with the finish reason. Every way out of
the engine (finish, abort, deadline, error) goes through `_finish`, which returns the
sequence's KV blocks and adapter pin.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraserve.adapters.layer import SlotTable
from loraserve.adapters.manager import AdapterManager
from loraserve.adapters.store import AdapterStore
from loraserve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from loraserve.engine.kv_cache import BlockManager, KVCache
from loraserve.engine.runner import ModelRunner, ScheduledSeq
from loraserve.engine.sampler import sample
from loraserve.engine.scheduler import Scheduler
from loraserve.engine.sequence import (
    FinishReason,
    GenerationRequest,
    Sequence,
    SequenceOutput,
    Status,
    StoppingCriteria,
)
from loraserve.errors import InternalError, ResourceExhausted, ServeError, Unavailable
from loraserve.ids import tenant_of
from loraserve.model_loader import LoadedModel

log = logging.getLogger(__name__)
IDLE_WAIT_SECONDS = 0.05


@dataclass
class EngineConfig:
    """The engine's knobs, as plain values (built from ServerConfig by the server)."""

    adapters_dir: Path | None = None
    max_loaded_adapters: int = 8
    max_lora_rank: int = 16
    max_host_adapter_bytes: int = 2 * 1024**3
    lora_target_modules: list[str] | None = None
    adapter_load_workers: int = 2
    block_size: int = 16
    kv_cache_bytes: int = 0
    kv_cache_memory_fraction: float = 0.3
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    tenant_weights: dict[str, float] = field(default_factory=dict)
    max_queue_size: int = 1024
    max_queue_per_tenant: int = 256

    @classmethod
    def from_server_config(cls, config: Any) -> EngineConfig:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


def available_memory(device: torch.device) -> int:
    """Free bytes on the device (CUDA) or available RAM (CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 1024**3


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return ids


class Engine:
    """Owns the KV cache, the adapter slots, the scheduler and the runner of one base model."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, metrics: Any = None) -> None:
        self.loaded = loaded
        self.config = config
        self.metrics = metrics
        self.tokenizer = loaded.tokenizer
        self.eos_ids = eos_token_ids(loaded)
        model_config = loaded.model.config
        num_layers = model_config.num_hidden_layers
        kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
        head_dim = (
            getattr(model_config, "head_dim", None)
            or model_config.hidden_size // model_config.num_attention_heads
        )

        self.slots = SlotTable.attach(
            loaded.model,
            config.max_loaded_adapters,
            config.max_lora_rank,
            loaded.dtype,
            loaded.device,
            config.lora_target_modules,
        )
        store = AdapterStore(config.adapters_dir) if config.adapters_dir is not None else None
        self.adapters = AdapterManager(
            store,
            self.slots,
            config.max_host_adapter_bytes,
            config.adapter_load_workers,
            loaded.name,
            metrics,
            wake=self.wake,
        )
        per_block = KVCache.bytes_per_block(num_layers, config.block_size, kv_heads, head_dim, loaded.dtype)
        budget = config.kv_cache_bytes or int(
            available_memory(loaded.device) * config.kv_cache_memory_fraction
        )
        useful = config.max_num_seqs * math.ceil(loaded.max_context_length / config.block_size)
        num_blocks = max(1, min(budget // per_block, useful))
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.kv = KVCache(
            num_layers, num_blocks, config.block_size, kv_heads, head_dim, loaded.dtype, loaded.device
        )
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB); %d adapter slots of rank %d (%.1f MiB)",
            num_blocks,
            config.block_size,
            num_blocks * per_block / 2**20,
            config.max_loaded_adapters,
            config.max_lora_rank,
            self.slots.bytes_per_slot * config.max_loaded_adapters / 2**20,
        )
        self.scheduler = Scheduler(
            self.blocks,
            self.adapters,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.tenant_weights,
            metrics,
        )
        self.runner = ModelRunner(loaded.model, self.kv, self.slots, loaded.device)

        self._lock = threading.Lock()
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[tuple[Sequence, FinishReason, ServeError | None]] = deque()
        self._in_flight: dict[str, int] = {}
        self._in_flight_total = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # ------------------------------------------------------------------ public API
    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def submit(self, request: GenerationRequest, sink: Callable[[SequenceOutput], None]) -> Sequence:
        """Queues a request (any thread). Raises NotFound/ResourceExhausted/... at once."""
        if self._stopping:
            raise Unavailable("the engine is shutting down")
        need = len(request.prompt_ids) + request.stopping.max_new_tokens
        if need > self.capacity_tokens:
            raise ResourceExhausted(
                f"prompt + max_new_tokens = {need} tokens exceeds the KV cache capacity of "
                f"{self.capacity_tokens}"
            )
        tenant = tenant_of(request.tenant, request.adapter_id)
        with self._lock:
            waiting = self._in_flight_total - self.scheduler.num_running
            if waiting >= self.config.max_queue_size:
                raise ResourceExhausted(
                    f"server queue is full ({self.config.max_queue_size} requests waiting)"
                )
            if self._in_flight.get(tenant, 0) >= self.config.max_queue_per_tenant:
                raise ResourceExhausted(
                    f"tenant {tenant!r} has {self.config.max_queue_per_tenant} requests in flight (its limit)"
                )
            entry = self.adapters.acquire(request.adapter_id) if request.adapter_id else None
            self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1
            self._in_flight_total += 1
        seq = Sequence(
            request,
            entry,
            sink,
            IncrementalDetokenizer(self.tokenizer),
            StopChecker(request.stopping.stop_sequences),
        )
        with self._lock:
            self._inbox.append(seq)
        self.wake()
        return seq

    def abort(
        self, seq: Sequence, reason: FinishReason = FinishReason.CANCELLED, error: ServeError | None = None
    ) -> None:
        """Ends a request at the next step (client cancelled, deadline passed...). Any thread."""
        with self._lock:
            self._aborts.append((seq, reason, error))
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        """Runs the step loop on a new thread (for an engine built on the caller's thread)."""
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    @classmethod
    def spawn(
        cls,
        build: Callable[[], tuple[LoadedModel, EngineConfig]],
        metrics: Any = None,
        warmup: bool = True,
    ) -> Future:
        """Loads the model (`build`), builds the engine, warms it up and runs its loop, all on one
        new thread.

        Returns a future of the running engine. Keeping every tensor operation of the process on
        one thread matters on CPU: each thread that runs torch ops gets its own OpenMP team, and
        a second team beside the engine's made its steps about a third slower in our measurements.
        """
        ready: Future = Future()

        def main() -> None:
            try:
                engine = cls(*build(), metrics)
                engine._thread = threading.current_thread()
                if warmup:
                    engine.warm_up()
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                ready.set_exception(error)
                return
            ready.set_result(engine)
            engine._loop()

        threading.Thread(target=main, name="engine", daemon=True).start()
        return ready

    def warm_up(self) -> None:
        """One short generation on the calling thread (first-call costs are paid here)."""
        ids = self.tokenizer("Hello")["input_ids"] or [self.tokenizer.eos_token_id or 0]
        done: list[SequenceOutput] = []
        request = GenerationRequest(
            "warmup", ids, stopping=StoppingCriteria(max_new_tokens=1, ignore_eos=True)
        )
        self.submit(request, done.append)
        while not (done and done[-1].done):
            self.step()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the loop; requests still in flight end with UNAVAILABLE."""
        self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self._drain_inbox()
        for seq in self.scheduler.all_sequences():
            self._finish(seq, FinishReason.ERROR, Unavailable("the server is shutting down"))
        self.adapters.shutdown()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight_total

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while not self._stopping:
            try:
                worked = self.step()
            except Exception:
                log.exception("engine step failed")
                worked = False
            if not worked:
                self._wake.wait(IDLE_WAIT_SECONDS if self.scheduler.has_work() else 1.0)
                self._wake.clear()

    def step(self) -> bool:
        """One iteration; returns False when nothing could run."""
        started = time.perf_counter()
        self._drain_inbox()
        self._expire()
        self.adapters.housekeeping()
        batch, failed = self.scheduler.schedule()
        for seq, error in failed:
            self._finish(seq, FinishReason.ERROR, error)
        self._report_queues()
        if not batch:
            return False
        now = time.monotonic()
        for item in batch:
            if item.seq.first_scheduled is None:
                item.seq.first_scheduled = now
        try:
            logits = self.runner.execute(batch)
        except torch.OutOfMemoryError:
            self._on_out_of_memory(batch)
            return True
        except Exception as error:
            log.exception("forward pass failed for %d requests", len(batch))
            for item in batch:
                self._finish(item.seq, FinishReason.ERROR, InternalError(f"forward pass failed: {error}"))
            return True
        sampled = [item.seq for item in batch if item.samples]
        for item in batch:
            item.seq.num_computed += item.num_new
        if sampled:
            tokens = sample(
                logits,
                [s.request.sampling for s in sampled],
                [s.generator for s in sampled],
                [
                    s.prompt_ids + s.output_ids if s.request.sampling.repetition_penalty != 1.0 else []
                    for s in sampled
                ],
            )
            for seq, token in zip(sampled, tokens):
                self._append(seq, token)
        self.steps += 1
        self._report_step(batch, time.perf_counter() - started)
        return True

    # ------------------------------------------------------------------ helpers
    def _drain_inbox(self) -> None:
        with self._lock:
            arrivals, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = list(self._aborts), deque()
        for seq in arrivals:
            self.scheduler.add(seq)
        for seq, reason, error in aborts:
            if not seq.finished:
                self._finish(seq, reason, error)

    def _expire(self) -> None:
        now = time.monotonic()
        for seq in self.scheduler.all_sequences():
            if now > seq.deadline:
                self._finish(seq, FinishReason.TIME_LIMIT)

    def _append(self, seq: Sequence, token: int) -> None:
        """Adds a sampled token; emits text; finishes the sequence when a stop condition holds."""
        now = time.monotonic()
        try:
            seq.output_ids.append(token)
            self.scheduler.charge_output(seq)
            if seq.first_token is None:
                seq.first_token = now
            elif self.metrics is not None:
                self.metrics.inter_token_latency.observe(now - seq.last_token)
            seq.last_token = now
            stopping = seq.request.stopping
            reason = None
            if token in self.eos_ids and not stopping.ignore_eos:
                reason = FinishReason.EOS
                text = ""
            else:
                text, stopped = seq.stop_checker.push(seq.detokenizer.add(token))
                if stopped:
                    reason = FinishReason.STOP_SEQUENCE
            if reason is None and len(seq.output_ids) >= stopping.max_new_tokens:
                reason = FinishReason.LENGTH
            if reason is not None:
                self._finish(seq, reason, pending_text=text, new_tokens=[token])
            else:
                self._emit(seq, SequenceOutput(text, [token]))
        except Exception as error:
            log.exception("request %s failed while appending a token", seq.request_id)
            self._finish(seq, FinishReason.ERROR, InternalError(f"output processing failed: {error}"))

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        error: ServeError | None = None,
        pending_text: str = "",
        new_tokens: list[int] | None = None,
    ) -> None:
        if seq.finished:
            return
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        text = pending_text
        if reason in (FinishReason.EOS, FinishReason.LENGTH, FinishReason.TIME_LIMIT, FinishReason.CANCELLED):
            tail, _ = seq.stop_checker.push(seq.detokenizer.flush())
            text += tail + seq.stop_checker.flush()
        if seq.adapter is not None:
            self.adapters.release(seq.adapter)
        with self._lock:
            self._in_flight[seq.tenant] -= 1
            if self._in_flight[seq.tenant] == 0:
                del self._in_flight[seq.tenant]
            self._in_flight_total -= 1
        self._emit(
            seq,
            SequenceOutput(
                text,
                new_tokens or [],
                reason,
                error,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids),
                arrival=seq.request.arrival,
                first_scheduled=seq.first_scheduled,
                first_token=seq.first_token,
                finished=time.monotonic(),
                preemptions=seq.preemptions,
            ),
        )

    def _emit(self, seq: Sequence, output: SequenceOutput) -> None:
        try:
            seq.sink(output)
        except Exception:
            log.debug("dropping output of request %s: sink failed", seq.request_id, exc_info=True)

    def _on_out_of_memory(self, batch: list[ScheduledSeq]) -> None:
        """Out of device memory on one batch: requeue its requests once, then fail them."""
        log.error(
            "out of memory on a batch of %d requests (%d tokens)",
            len(batch),
            sum(item.num_new for item in batch),
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for item in batch:
            seq = item.seq
            if seq.preemptions > 0:
                self._finish(
                    seq, FinishReason.ERROR, ResourceExhausted("out of device memory for this request")
                )
            elif seq.status is Status.RUNNING:
                self.scheduler.preempt(seq)

    def _report_queues(self) -> None:
        if self.metrics is None:
            return
        self.metrics.requests_running.set(self.scheduler.num_running)
        self.metrics.requests_waiting.set(self.scheduler.num_waiting)
        self.metrics.kv_cache_usage.set(self.blocks.usage)

    def _report_step(self, batch: list[ScheduledSeq], seconds: float) -> None:
        if self.metrics is None:
            return
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(sum(item.num_new for item in batch))
        self.metrics.batch_adapters.observe(len({item.seq.slot for item in batch if item.seq.slot >= 0}))
        self.metrics.step_duration.observe(seconds)
        self._report_queues()
