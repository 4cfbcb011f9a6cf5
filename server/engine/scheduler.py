"""Chooses what runs in each step: token budget, KV blocks, adapter slots, fairness.

Order within a step: running decodes first (one token each, so latency stays low), then
running prompts in progress (chunked prefill), then new admissions from the waiting queues
in fair-share order. A waiting request is admitted only when its adapter holds a device
slot (placed now if its weights are in host memory; loaded off-thread otherwise, the
request staying queued meanwhile) and the KV blocks for its first chunk are free; it first
takes the cached blocks of its longest cached prefix (prefix_cache.py), and its prefill starts
after them (a re-admitted preempted sequence too, so recompute often finds its own blocks). When a
running sequence cannot grow, the most recently admitted one is preempted: its blocks go
back to the pool and it re-queues at the front of its tenant's queue, to be recomputed.

When device slots are short, admission avoids thrash: it prefers, in fair-share order, a
request whose adapter is resident or can be placed without evicting an adapter that another
queued request needs; only when none can does it evict one the queue needs (the one needed
last). A request whose adapter is ready in host memory but was passed over that way
MAX_PASS_OVERS times goes first at the next admission (while it waits for a slot with every
slot held by the running batch, only base-model requests are admitted), so a cold adapter's
wait is bounded. After admitting, the scheduler stages (prefetches) the adapters the queue
needs next into slots, host -> device, so a request finds its adapter resident; disk reads
run on reader threads from the moment a request arrives, and no step waits on them.

A sequence the scheduler cannot serve never stays queued: one whose adapter failed, or which
has nothing left to compute (a broken invariant: it would never run again), is handed back as
failed, for the engine to end with an error.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque

from loraserve.engine.fairness import VirtualTokenCounter
from loraserve.engine.kv_cache import BlockManager
from loraserve.engine.prefix_cache import PrefixCache
from loraserve.engine.sequence import ScheduledSeq, Sequence, Status
from loraserve.errors import InternalError, ServeError

log = logging.getLogger(__name__)

# How far into one tenant's queue to look for a request whose adapter is ready.
LOOKAHEAD = 16
# Admissions that may pass over a request whose adapter waits in host memory for a slot, because
# placing it would have evicted an adapter that other queued requests need, before it goes first.
MAX_PASS_OVERS = 8
# Queued requests (in admission order) whose adapters count as needed next: evictions spare them
# and prefetch stages them.
NEED_HORIZON = 256
# Adapters staged host -> slot between two steps at most (each is a copy into the slot buffers).
STAGE_PER_STEP = 4


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        adapters: object | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        tenant_weights: dict[str, float] | None = None,
        metrics: object | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.blocks = blocks
        self.prefix_cache = prefix_cache or PrefixCache(blocks, "", enabled=False)
        self.adapters = adapters  # adapters.manager.AdapterManager, or None without a store
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.fairness = VirtualTokenCounter(tenant_weights)
        self.metrics = metrics
        self.waiting: dict[str, deque[Sequence]] = {}
        self.running: list[Sequence] = []
        self.preemptions = 0
        # Queued requests passed over for the sake of the slots (weak: a finished one drops out).
        self.passed_over: weakref.WeakKeyDictionary[Sequence, int] = weakref.WeakKeyDictionary()
        self.max_passed_over = 0  # the most times one request was passed over so far (a measure)
        self._queue_planned = False  # the adapter manager knows the queue's needs as they are

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
        self._queue_planned = False

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
        self.prefix_cache.apply_retirements()

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
            hits = self.prefix_cache.match(seq)
            cached = len(hits) * self.blocks.block_size
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_take(hits, cached + n):
                self._release_slot_if_unused(seq)
                break
            self._admit(seq)
            self.prefix_cache.attach(seq, hits)
            self.blocks.grow(seq.block_table, seq.num_computed + n)
            batch.append(ScheduledSeq(seq, n))
            budget -= n

        for item in batch:
            if item.seq.preemptions == 0 and item.seq.num_computed < len(item.seq.prompt_ids):
                self.fairness.charge(item.seq.tenant, prompt_tokens=item.num_new)
        self._stage_ahead()
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
        self._queue_planned = False

    # ------------------------------------------------------------------ adapters and slots
    def _next_admissible(self, failed: list[tuple[Sequence, ServeError]]) -> Sequence | None:
        """The next waiting sequence to admit, its adapter placed in a device slot (None: none can be).

        1. a request passed over MAX_PASS_OVERS times, evicting what it must (while it cannot be
           placed at all, only base-model requests are admitted);
        2. in fair-share order, the first whose adapter is resident or placeable without evicting
           one the queue needs; the requests with ready adapters skipped on the way count a pass-over;
        3. in fair-share order, the first whose adapter can be placed at all.
        """
        if not self._queue_planned:
            self._plan_queue()
        overdue = sorted(
            (seq for seq, count in self.passed_over.items() if count >= MAX_PASS_OVERS),
            key=lambda seq: seq.request.arrival,
        )
        for seq in overdue:
            queue = self.waiting.get(seq.tenant)
            if seq.status is not Status.WAITING or queue is None or seq not in queue:
                continue
            if self._place(seq, queue, failed, allow_needed=True):
                return seq
        holding = bool(overdue)
        skipped: list[Sequence] = []
        for allow_needed in (False, True):
            for tenant in self.fairness.order(t for t, q in self.waiting.items() if q):
                queue = self.waiting[tenant]
                for seq in list(queue)[:LOOKAHEAD]:
                    if holding and seq.adapter is not None:
                        continue
                    if self._place(seq, queue, failed, allow_needed):
                        for passed in skipped:
                            self._pass_over(passed)
                        return seq
                    if not allow_needed and seq.adapter is not None and seq.adapter.tier == "host":
                        skipped.append(seq)
        return None

    def _place(
        self,
        seq: Sequence,
        queue: deque[Sequence],
        failed: list[tuple[Sequence, ServeError]],
        allow_needed: bool,
    ) -> bool:
        """Gives the sequence its slot (seq.slot; -1 without an adapter); False when it has none yet.
        A sequence that cannot be served leaves the queue into `failed`."""
        try:
            if seq.remaining < 1:
                raise _stuck(seq)
            slot = -1 if seq.adapter is None else self.adapters.try_place(seq.adapter, allow_needed)
        except Exception as error:
            if not isinstance(error, ServeError):
                log.exception("request %s: placing its adapter failed", seq.request_id)
                error = InternalError(f"placing the adapter failed: {error}")
            queue.remove(seq)
            self.passed_over.pop(seq, None)
            failed.append((seq, error))
            return False
        if slot is None:
            return False
        seq.slot = slot
        self.passed_over.pop(seq, None)
        return True

    def _pass_over(self, seq: Sequence) -> None:
        count = self.passed_over.get(seq, 0) + 1
        self.passed_over[seq] = count
        self.max_passed_over = max(self.max_passed_over, count)

    def _queue_order(self) -> list[Sequence]:
        """Up to NEED_HORIZON waiting sequences in about the order they would be admitted: the
        tenants' queues taken in turn, in fair-share order."""
        queues = [iter(self.waiting[t]) for t in self.fairness.order(t for t, q in self.waiting.items() if q)]
        order: list[Sequence] = []
        while queues and len(order) < NEED_HORIZON:
            for it in list(queues):
                seq = next(it, None)
                if seq is None:
                    queues.remove(it)
                else:
                    order.append(seq)
        return order[:NEED_HORIZON]

    def _plan_queue(self) -> list[Sequence]:
        """Tells the adapter manager what the queue needs next; returns that order."""
        order = self._queue_order()
        if self.adapters is not None:
            self.adapters.plan_queue([seq.adapter for seq in order if seq.adapter is not None])
        self._queue_planned = True
        return order

    def _stage_ahead(self) -> None:
        """Prefetch: puts the adapters of the next queued requests in device slots (host -> slot,
        between steps, on this thread), evicting none that the queue needs. Their disk reads
        started on reader threads when the requests arrived."""
        if self.adapters is None:
            return
        staged = 0
        seen: set[int] = set()
        for seq in self._plan_queue():
            entry = seq.adapter
            if entry is None or id(entry) in seen or entry.tier == "device":
                continue
            seen.add(id(entry))
            ready = entry.tier == "host"
            if self.adapters.stage(entry) and ready:
                staged += 1
                if staged >= STAGE_PER_STEP:
                    break

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
