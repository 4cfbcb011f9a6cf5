"""Chooses what runs in each step: token budget, KV blocks, adapter slots, fairness.

Order within a step: running decodes first (one token each, so latency stays low), then
running prompts in progress (chunked prefill), then new admissions from the waiting queues
in fair-share order. A waiting request is admitted only when its adapter holds a device
slot (placed now if its weights are in host memory; loaded off-thread otherwise, the
request staying queued meanwhile) and the KV blocks for its first chunk are free. When a
running sequence cannot grow, the most recently admitted one is preempted: its blocks go
back to the pool and it re-queues at the front of its tenant's queue, to be recomputed.

A sequence the scheduler cannot serve never stays queued: one whose adapter failed, or which
has nothing left to compute (a broken invariant: it would never run again), is handed back as
failed, for the engine to end with an error.
"""

from __future__ import annotations

import logging
from collections import deque

from loraserve.engine.fairness import VirtualTokenCounter
from loraserve.engine.kv_cache import BlockManager
from loraserve.engine.sequence import ScheduledSeq, Sequence, Status
from loraserve.errors import InternalError, ServeError

log = logging.getLogger(__name__)

# How far into one tenant's queue to look for a request whose adapter is ready.
LOOKAHEAD = 16


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        adapters: object | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        tenant_weights: dict[str, float] | None = None,
        metrics: object | None = None,
    ) -> None:
        self.blocks = blocks
        self.adapters = adapters  # adapters.manager.AdapterManager, or None without a store
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.fairness = VirtualTokenCounter(tenant_weights)
        self.metrics = metrics
        self.waiting: dict[str, deque[Sequence]] = {}
        self.running: list[Sequence] = []
        self.preemptions = 0

    # ------------------------------------------------------------------ queues
    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or any(self.waiting.values())

    def all_sequences(self) -> list[Sequence]:
        return list(self.running) + [s for q in self.waiting.values() for s in q]

    def _backlogged(self) -> set[str]:
        return {t for t, q in self.waiting.items() if q} | {s.tenant for s in self.running}

    def add(self, seq: Sequence) -> None:
        tenant = seq.tenant
        if tenant not in self._backlogged():
            self.fairness.activate(tenant, self._backlogged())
        self.waiting.setdefault(tenant, deque()).append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out of the queues, releasing its KV blocks and slot pin."""
        try:
            if seq.status is Status.RUNNING:
                self.running.remove(seq)
                self._leave_running(seq)
            elif seq.status is Status.WAITING:
                queue = self.waiting.get(seq.tenant)
                if queue is not None and seq in queue:
                    queue.remove(seq)
        finally:
            self.blocks.release(seq.block_table)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> tuple[list[ScheduledSeq], list[tuple[Sequence, ServeError]]]:
        """Returns (the step's batch ordered by adapter slot, sequences whose adapter failed)."""
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        failed: list[tuple[Sequence, ServeError]] = []

        for seq in self.running:
            if seq.remaining < 1:
                failed.append((seq, _stuck(seq)))
        decodes = [s for s in self.running if s.remaining == 1]
        prefills = [s for s in self.running if s.remaining > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.remaining, budget)
            if not self._make_room(seq, n, batch):
                continue
            self.blocks.grow(seq.block_table, seq.num_computed + n)
            batch.append(ScheduledSeq(seq, n))
            budget -= n

        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_admissible(failed)
            if seq is None:
                break
            n = min(seq.remaining, budget)
            if not self.blocks.can_grow(seq.block_table, seq.num_computed + n):
                self._release_slot_if_unused(seq)
                break
            self._admit(seq)
            self.blocks.grow(seq.block_table, seq.num_computed + n)
            batch.append(ScheduledSeq(seq, n))
            budget -= n

        for item in batch:
            if item.seq.preemptions == 0 and item.seq.num_computed < len(item.seq.prompt_ids):
                self.fairness.charge(item.seq.tenant, prompt_tokens=item.num_new)
        batch.sort(key=lambda item: item.seq.slot)
        return batch, failed

    def charge_output(self, seq: Sequence, tokens: int = 1) -> None:
        self.fairness.charge(seq.tenant, output_tokens=tokens)

    def _make_room(self, seq: Sequence, n: int, batch: list[ScheduledSeq]) -> bool:
        """Preempts the newest running sequences until `seq` can grow by n; False if it was preempted."""
        scheduled = {id(item.seq) for item in batch}
        while not self.blocks.can_grow(seq.block_table, seq.num_computed + n):
            victims = [s for s in self.running if id(s) not in scheduled]
            victim = victims[-1] if victims else seq
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's blocks; it will recompute its prompt and output so far."""
        self.running.remove(seq)
        self._leave_running(seq)
        self.blocks.release(seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        if self.metrics is not None:
            self.metrics.preemptions.inc()
        self.waiting.setdefault(seq.tenant, deque()).appendleft(seq)

    def _next_admissible(self, failed: list[tuple[Sequence, ServeError]]) -> Sequence | None:
        """The first waiting sequence, in fair-share order, whose adapter has a device slot."""
        for tenant in self.fairness.order(t for t, q in self.waiting.items() if q):
            queue = self.waiting[tenant]
            for seq in list(queue)[:LOOKAHEAD]:
                try:
                    if seq.remaining < 1:
                        raise _stuck(seq)
                    slot = self._slot_for(seq)
                except Exception as error:
                    if not isinstance(error, ServeError):
                        log.exception("request %s: placing its adapter failed", seq.request_id)
                        error = InternalError(f"placing the adapter failed: {error}")
                    queue.remove(seq)
                    failed.append((seq, error))
                    continue
                if slot is not None:
                    seq.slot = slot
                    return seq
        return None

    def _slot_for(self, seq: Sequence) -> int | None:
        if seq.adapter is None:
            return -1
        return self.adapters.try_place(seq.adapter)

    def _release_slot_if_unused(self, seq: Sequence) -> None:
        seq.slot = -1  # placed but not admitted: the slot stays resident, unpinned (evictable)

    def _admit(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.adapters.pin(seq.adapter)  # first: if it fails, the sequence is still only queued
        self.waiting[seq.tenant].remove(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)

    def _leave_running(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.adapters.unpin(seq.adapter)
        seq.slot = -1


def _stuck(seq: Sequence) -> InternalError:
    return InternalError(
        f"request {seq.request_id} has no token left to compute ({seq.num_computed} of {seq.num_tokens})"
    )
