"""The engine: one step loop serving many requests on many adapters per forward pass.

Each step is three verbs, as in nano-vllm's loop:

    schedule (arrivals, aborts, deadlines, the batch) -> run (forward + sample) -> postprocess

and runs on the engine's own thread, so the asyncio gRPC server never blocks on model compute.
Callers `submit` a GenerationRequest with a sink; after each step the sink receives a
SequenceOutput with the new text, and a last one with the finish reason. Every way out of
the engine (finish, abort, deadline, error) goes through `Outputs.finish` (output.py), which
returns the sequence's KV blocks, adapter pin and admission. A step is transactional per
sequence: a sequence advances only when its row produced a token, and a failure anywhere in
a step ends the sequences it touched with an error instead of leaving them unschedulable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from loraserve.adapters.layer import SlotTable, find_lora_targets
from loraserve.adapters.manager import AdapterManager
from loraserve.adapters.slot_sizing import bytes_per_slot, slot_count
from loraserve.adapters.store import AdapterStore
from loraserve.engine.admission import Admission
from loraserve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from loraserve.engine.kv_cache import BlockManager, KVCache
from loraserve.engine.kv_sizing import KVGeometry, adapter_memory_budget, kv_cache_blocks, kv_cache_budget
from loraserve.engine.output import Outputs
from loraserve.engine.prefix_cache import PrefixCache
from loraserve.engine.runner import ModelRunner
from loraserve.engine.sampler import sample
from loraserve.engine.scheduler import Scheduler
from loraserve.engine.sequence import (
    FinishReason,
    GenerationRequest,
    ScheduledSeq,
    Sequence,
    SequenceOutput,
    Status,
    StoppingCriteria,
)
from loraserve.engine.timeshare import TimeShare
from loraserve.errors import InternalError, ResourceExhausted, ServeError, Unavailable
from loraserve.ids import tenant_of
from loraserve.model_loader import LoadedModel

log = logging.getLogger(__name__)
IDLE_WAIT_SECONDS = 0.05


@dataclass
class EngineConfig:
    """The engine's knobs, as plain values (built from ServerConfig by the server)."""

    adapters_dir: Path | None = None
    max_loaded_adapters: int | str = "auto"  # a slot count, or "auto": as many as the budget below holds
    adapter_memory_bytes: int = 0
    adapter_memory_fraction: float = 0.1
    max_lora_rank: int = 16
    max_host_adapter_bytes: int = 2 * 1024**3
    max_adapter_bytes: int = 0  # 0: derived from the base's modules and max_lora_rank
    lora_target_modules: list[str] | None = None
    lora_backend: str = "auto"  # loraserve.adapters.lora_backends.select_lora_backend
    adapter_load_workers: int = 2
    block_size: int = 16
    kv_cache_bytes: int = 0
    kv_cache_memory_fraction: float = 0.3
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    tenant_weights: dict[str, float] = field(default_factory=dict)
    max_queue_size: int = 1024
    max_queue_per_tenant: int = 256
    enable_prefix_caching: bool = True

    @classmethod
    def from_server_config(cls, config: Any) -> EngineConfig:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


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


class SideWork(Protocol):
    """Work the engine's thread does between serving steps (loraserve.training.worker)."""

    def has_work(self) -> bool: ...

    def run_slice(self) -> None: ...


class Engine:
    """Owns the KV cache, the adapter slots, the scheduler and the runner of one base model."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, metrics: Any = None) -> None:
        self.loaded = loaded
        self.config = config
        self.metrics = metrics
        self.tokenizer = loaded.tokenizer
        self.eos_ids = eos_token_ids(loaded)

        self.slots = SlotTable.attach(
            loaded.model,
            self._slot_count(loaded, config),
            config.max_lora_rank,
            loaded.dtype,
            loaded.device,
            config.lora_target_modules,
            config.lora_backend,
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
            max_adapter_bytes=config.max_adapter_bytes,
            # The prefix cache exists by the time an adapter can be unloaded or reloaded.
            on_retire=lambda adapter_id: self.prefix_cache.retire(adapter_id),
        )
        geometry = KVGeometry.of(loaded.model.config)
        num_blocks = kv_cache_blocks(
            geometry,
            loaded.dtype,
            config.block_size,
            kv_cache_budget(config, loaded.device),
            config.max_num_seqs,
            loaded.max_context_length,
        )
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.prefix_cache = PrefixCache(self.blocks, loaded.name, config.enable_prefix_caching, metrics)
        self.kv = KVCache(
            geometry.num_layers,
            num_blocks,
            config.block_size,
            geometry.num_kv_heads,
            geometry.head_dim,
            loaded.dtype,
            loaded.device,
        )
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB); %d adapter slots of rank %d (%.1f MiB)",
            num_blocks,
            config.block_size,
            num_blocks * geometry.bytes_per_block(config.block_size, loaded.dtype) / 2**20,
            self.slots.num_slots,
            config.max_lora_rank,
            self.slots.bytes_per_slot * self.slots.num_slots / 2**20,
        )
        self.scheduler = Scheduler(
            self.blocks,
            self.adapters,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.tenant_weights,
            metrics,
            self.prefix_cache,
        )
        self.runner = ModelRunner(loaded.model, self.kv, self.slots, loaded.device)
        self.admission = Admission(config.max_queue_size, config.max_queue_per_tenant)
        self.outputs = Outputs(self.scheduler, self.adapters, self.admission, self.eos_ids, metrics)

        self._lock = threading.Lock()  # guards the inbox and the aborts, filled from any thread
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[tuple[Sequence, FinishReason, ServeError | None]] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.side_work: SideWork | None = None  # training, sliced between serving steps
        self.timeshare: TimeShare | None = None

    @staticmethod
    def _slot_count(loaded: LoadedModel, config: EngineConfig) -> int:
        """Device slots: the configured count, or (auto) as many as the adapter memory budget holds.

        Sized before the KV cache, which then takes its fraction of the memory left."""
        if config.max_loaded_adapters != "auto":
            return int(config.max_loaded_adapters)
        targets = find_lora_targets(loaded.model, config.lora_target_modules)
        shapes = {name: (linear.in_features, linear.out_features) for name, linear in targets.items()}
        per_slot = bytes_per_slot(shapes, config.max_lora_rank, loaded.dtype)
        return slot_count("auto", per_slot, adapter_memory_budget(config, loaded.device))

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
        self.admission.enter(tenant, self.scheduler.num_running)
        entry = None
        try:
            entry = self.adapters.acquire(request.adapter_id) if request.adapter_id else None
            seq = Sequence(
                request,
                entry,
                sink,
                IncrementalDetokenizer(self.tokenizer),
                StopChecker(request.stopping.stop_sequences),
            )
        except BaseException:
            self._undo_submit(tenant, entry)
            raise
        with self._lock:
            # Checked again under the lock that shutdown takes: past it, shutdown drains the inbox.
            stopping = self._stopping
            if not stopping:
                self._inbox.append(seq)
        if stopping:
            self._undo_submit(tenant, entry)
            raise Unavailable("the engine is shutting down")
        self.wake()
        return seq

    def _undo_submit(self, tenant: str, entry: Any) -> None:
        """Refused before it was queued: gives back what submit took, so nothing stays counted."""
        if entry is not None:
            self.adapters.release(entry)
        self.admission.leave(tenant)

    def abort(
        self, seq: Sequence, reason: FinishReason = FinishReason.CANCELLED, error: ServeError | None = None
    ) -> None:
        """Ends a request at the next step (client cancelled, deadline passed...). Any thread."""
        with self._lock:
            self._aborts.append((seq, reason, error))
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def attach_side_work(self, work: SideWork, share: float) -> None:
        """Runs `work.run_slice()` on the engine's thread between serving steps, while
        `work.has_work()`, taking at most `share` of the engine's time while it serves
        (loraserve.engine.timeshare) and all of it while it does not."""
        self.timeshare = TimeShare(share)
        self.side_work = work

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
        with self._lock:
            self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self._drain_inbox()
        for seq in self.scheduler.all_sequences():
            self.outputs.finish(seq, FinishReason.ERROR, Unavailable("the server is shutting down"))
        self.adapters.shutdown()

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while not self._stopping:
            started = time.perf_counter()
            try:
                worked = self.step()
            except Exception:
                log.exception("engine step failed")
                worked = False
            if worked and self.timeshare is not None:
                self.timeshare.add_serving(time.perf_counter() - started)
            if self._side_slice(serving_busy=worked or self.scheduler.has_work()):
                continue
            if not worked:
                self._wake.wait(IDLE_WAIT_SECONDS if self.scheduler.has_work() else 1.0)
                self._wake.clear()

    def _side_slice(self, serving_busy: bool) -> bool:
        """One slice of side work when there is some and the time share allows; True if it ran."""
        work, share = self.side_work, self.timeshare
        if work is None or share is None or not work.has_work() or not share.side_due(serving_busy):
            return False
        started = time.perf_counter()
        try:
            work.run_slice()
        except Exception:  # the worker ends its own job's failures; this is a last resort
            log.exception("side work failed")
        share.add_side(time.perf_counter() - started)
        return True

    def step(self) -> bool:
        """One iteration: schedule -> run (forward + sample) -> postprocess. False when nothing ran."""
        started = time.perf_counter()
        batch = self._schedule()
        if not batch:
            return False
        results = self._run(batch)
        if results is not None:
            self._postprocess(batch, results)
        self.steps += 1
        self._report_step(batch, time.perf_counter() - started)
        return True

    # ------------------------------------------------------------------ the three verbs
    def _schedule(self) -> list[ScheduledSeq]:
        """Takes in arrivals and aborts, ends expired requests, and picks this step's batch."""
        self._drain_inbox()
        self._expire()
        try:
            self.adapters.housekeeping()
        except Exception:
            log.exception("adapter housekeeping failed")
        try:
            batch, failed = self.scheduler.schedule()
        except Exception as error:
            # The scheduler's own state is in doubt: end what it holds rather than retry forever.
            log.exception("scheduling failed; ending the %d requests queued or running", self.in_flight)
            failed = [
                (seq, InternalError(f"scheduling failed: {error}")) for seq in self.scheduler.all_sequences()
            ]
            batch = []
        for seq, failure in failed:
            self.outputs.finish(seq, FinishReason.ERROR, failure)
        self._report_queues()
        now = time.monotonic()
        for item in batch:
            if item.seq.first_scheduled is None:
                item.seq.first_scheduled = now
        return batch

    def _run(self, batch: list[ScheduledSeq]) -> list[int | ServeError] | None:
        """The forward pass, then one token or error per sampling row (in batch order).

        None when the forward pass failed: its requests are then requeued (out of memory) or
        ended with an error, and nothing of the batch advances.
        """
        try:
            logits = self.runner.execute(batch)  # [n_sampled, vocab] fp32
        except torch.OutOfMemoryError:
            self._on_out_of_memory(batch)
            return None
        except Exception as error:
            log.exception("forward pass failed for %d requests", len(batch))
            for item in batch:
                self.outputs.finish(
                    item.seq, FinishReason.ERROR, InternalError(f"forward pass failed: {error}")
                )
            return None
        sampled = [item.seq for item in batch if item.samples]
        if not sampled:
            return []
        try:
            return sample(
                logits,
                [s.request.sampling for s in sampled],
                [s.generator for s in sampled],
                [
                    s.prompt_ids + s.output_ids if s.request.sampling.repetition_penalty != 1.0 else []
                    for s in sampled
                ],
            )
        except Exception as error:
            # The sampler isolates bad rows itself; this is the net under it: the sampling rows
            # fail, while the prompt chunks of the batch still advance.
            log.exception("sampling failed for %d requests", len(sampled))
            return [InternalError(f"sampling failed: {error}") for _ in sampled]

    def _postprocess(self, batch: list[ScheduledSeq], results: list[int | ServeError]) -> None:
        """Advances each sequence by what the step computed and emits its token, or ends it.

        Per sequence and all or nothing: a prompt chunk advances (its K/V are in the cache); a
        sampling row advances together with its token, or, when its row failed, is ended with
        that row's error; so no sequence is left with nothing to compute.
        """
        rows = iter(results)
        for item in batch:
            seq = item.seq
            if not item.samples:
                seq.num_computed += item.num_new
                self.prefix_cache.commit(seq)
                continue
            result = next(rows)
            if isinstance(result, ServeError):
                log.warning("request %s failed while sampling: %s", seq.request_id, result.message)
                self.outputs.finish(seq, FinishReason.ERROR, result)
                continue
            seq.num_computed += item.num_new
            self.prefix_cache.commit(seq)  # before append, which may end it and release its blocks
            self.outputs.append(seq, result)

    # ------------------------------------------------------------------ helpers
    def _drain_inbox(self) -> None:
        with self._lock:
            arrivals, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = list(self._aborts), deque()
        for seq in arrivals:
            try:
                self.scheduler.add(seq)
            except Exception as error:
                log.exception("request %s could not be queued", seq.request_id)
                self.outputs.finish(seq, FinishReason.ERROR, InternalError(f"queueing failed: {error}"))
        for seq, reason, error in aborts:
            self.outputs.finish(seq, reason, error)

    def _expire(self) -> None:
        now = time.monotonic()
        for seq in self.scheduler.all_sequences():
            if now > seq.deadline:
                self.outputs.finish(seq, FinishReason.TIME_LIMIT)

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
                self.outputs.finish(
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
        self.prefix_cache.report()

    def _report_step(self, batch: list[ScheduledSeq], seconds: float) -> None:
        if self.metrics is None:
            return
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(sum(item.num_new for item in batch))
        self.metrics.batch_adapters.observe(len({item.seq.slot for item in batch if item.seq.slot >= 0}))
        self.metrics.step_duration.observe(seconds)
        self._report_queues()
