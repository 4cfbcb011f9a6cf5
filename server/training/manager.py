"""Training jobs for the front ends: create, get, list, cancel, watch; register what finishes.

All job records live on the event loop's thread: the engine-side worker
(loraserve.training.worker) reports events, which are applied here in order. A job's data is
checked and tokenized off the loop before it is queued (loraserve.training.spec), so a bad
request fails at once. When the worker has written an adapter, it is loaded through the admin
verbs (a reload when it replaced one), so the next request for it is served with no
LoadAdapter call; only then is the job SUCCEEDED.

Rights: creating and cancelling need the admin right or the `train` right, and an adapter id
the caller's key allows; seeing a job needs a key that allows its adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loraserve.adapters.store import CONFIG_FILE
from loraserve.auth import Principal
from loraserve.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from loraserve.ids import tenant_of
from loraserve.training.jobs import JobRecord, JobState, JobTable, new_job_id
from loraserve.training.run import TrainingRun, restore_inference_layout
from loraserve.training.spec import JobRequest, TrainingSpec, prepare
from loraserve.training.worker import Event, TrainingWorker

log = logging.getLogger(__name__)
JOBS_FILE = "jobs.json"
STATE_FOLDER = ".loraserve-training"
MAX_JOB_ID_CHARS = 64  # inside the adapter store: not a valid adapter id


class TrainingManager:
    """The Training service's state over one engine."""

    def __init__(
        self, engine: Any, admin: Any, config: Any, metrics: Any = None, enabled: bool = True
    ) -> None:
        self.engine = engine
        self.admin = admin
        self.config = config
        self.metrics = metrics
        self.store: Path | None = Path(config.adapters_dir) if config.adapters_dir is not None else None
        self.enabled = enabled and self.store is not None and config.training_share > 0
        state_dir = config.training_state_dir or (self.store / STATE_FOLDER if self.store else None)
        # A server with training off never reads the table: another one may own it.
        self.table = JobTable(Path(state_dir) / JOBS_FILE if self.enabled and state_dir is not None else None)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._watchers: dict[str, set[asyncio.Queue]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._preparing: dict[str, str] = {}  # adapter id -> tenant of creates preparing their data
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="training-data")
        self.worker: TrainingWorker | None = None
        if self.enabled:
            self.worker = TrainingWorker(
                self._make_run,
                self.store,
                engine.loaded.name,
                self._report,
                config.training_max_seconds,
                on_idle=self._restore_layout,
            )
            engine.attach_side_work(self.worker, config.training_share)
        self._count_states()

    # ------------------------------------------------------------------ front-end verbs
    async def create(self, request: JobRequest, principal: Principal) -> JobRecord:
        self._check_enabled()
        principal.check_train(request.adapter_id)
        self.loop = asyncio.get_running_loop()
        tenant = tenant_of(principal.tenant, request.adapter_id)
        self._check_free(request.adapter_id, request.overwrite)
        self._check_quota(tenant)
        # Counted against the quotas while its data is prepared, so concurrent creates beyond
        # them are refused before any tokenizing; one thread prepares all jobs' data, so
        # creates never take the threads that serving's own tokenizing runs on.
        self._preparing[request.adapter_id] = tenant
        try:
            loaded = self.engine.loaded
            spec = await asyncio.get_running_loop().run_in_executor(
                self._preparer,
                prepare,
                request,
                tenant,
                loaded.tokenizer,
                list(self.engine.slots.layers),
                self.engine.config.max_lora_rank,
                min(loaded.max_context_length, self.config.training_micro_batch_tokens),
                self.config.training_max_data_bytes,
            )
        finally:
            del self._preparing[request.adapter_id]
        # Checked again: the loop ran other calls while the data was being tokenized.
        self._check_free(request.adapter_id, request.overwrite)
        self._check_quota(tenant)
        record = JobRecord(
            new_job_id(),
            request.adapter_id,
            tenant,
            total_steps=spec.options.steps,
            eval_examples=len(spec.evals),
            train_examples=len(spec.train),
            created=time.time(),
        )
        self.table.add(record)
        self.worker.submit(record.job_id, spec)
        self.engine.wake()
        self._count_states()
        log.info(
            "training job %s queued: adapter %s, %d steps, %d examples (%d held out)",
            record.job_id,
            record.adapter_id,
            record.total_steps,
            record.train_examples,
            record.eval_examples,
        )
        return record.copy()

    def get(self, job_id: str, principal: Principal) -> JobRecord:
        return self._visible(job_id, principal).copy()

    def list(self, principal: Principal) -> list[JobRecord]:
        rows = []
        for record in reversed(self.table.records.values()):
            try:
                principal.check_adapter(record.adapter_id)
            except PermissionDenied:  # not the caller's to see
                continue
            rows.append(record.copy())
        return rows

    def cancel(self, job_id: str, principal: Principal) -> JobRecord:
        """A queued job is CANCELLED at once; a running one at its next slice (the record returned
        is still RUNNING: watch it), unless it has finished training and is being written."""
        record = self._visible(job_id, principal)
        principal.check_train(record.adapter_id)
        if record.state.done:
            return record.copy()
        if self.worker is not None and self.worker.cancel(job_id):  # was still queued
            self._finish(record, JobState.CANCELLED, "")
        return record.copy()

    async def watch(self, job_id: str, principal: Principal) -> AsyncIterator[JobRecord]:
        """The job now, then a snapshot at each change, until it ends."""
        record = self._visible(job_id, principal)
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)  # the latest snapshot only: see _publish
        self._watchers.setdefault(job_id, set()).add(queue)
        try:
            yield record.copy()
            while not record.state.done:
                snapshot = await queue.get()
                yield snapshot
                if snapshot.state.done:
                    break
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._watchers[job_id]

    # ------------------------------------------------------------------ checks
    def _check_enabled(self) -> None:
        if self.worker is None and self.store is not None and self.config.training_share > 0:
            raise FailedPrecondition("this server does not train (Ray Serve replicas do not)")
        if self.store is None:
            raise FailedPrecondition(
                "training needs an adapter store to write into: start the server with --adapters-dir"
            )
        if not self.enabled:
            raise FailedPrecondition("training is disabled on this server (--training-share 0)")

    def _visible(self, job_id: str, principal: Principal) -> JobRecord:
        if not job_id:
            raise InvalidArgument("job_id is empty")
        if len(job_id) > MAX_JOB_ID_CHARS:
            raise InvalidArgument(f"job_id is longer than {MAX_JOB_ID_CHARS} characters")
        record = self.table.records.get(job_id)
        if record is None:
            raise NotFound(f"no training job {job_id!r}")
        principal.check_adapter(record.adapter_id)
        return record

    def _active(self) -> list[JobRecord]:
        return [r for r in self.table.records.values() if not r.state.done]

    def _check_free(self, adapter_id: str, overwrite: bool) -> None:
        """The id is not being trained or prepared, names no existing folder (unless `overwrite`,
        and then only an adapter's), sits in no adapter's folder, and the server can write it."""
        busy = [r.job_id for r in self._active() if r.adapter_id == adapter_id]
        if busy or adapter_id in self._preparing:
            by = f"job {busy[0]}" if busy else "a job being created"
            raise AlreadyExists(f"adapter {adapter_id!r} is already being trained by {by}")
        target = self.store / adapter_id
        if os.path.lexists(target):
            if not (target / CONFIG_FILE).is_file():
                raise AlreadyExists(f"{adapter_id!r} is a folder of adapters in the store, not an adapter")
            if not overwrite:
                raise AlreadyExists(
                    f"adapter {adapter_id!r} already exists in the store (set overwrite to replace it)"
                )
        if "/" in adapter_id and os.path.lexists(target.parent / CONFIG_FILE):
            org = adapter_id.split("/")[0]
            raise AlreadyExists(f"{org!r} is an adapter in the store: no adapter can be created inside it")
        parent = target.parent
        while not parent.exists() and parent != self.store:
            parent = parent.parent  # an org folder the job will create
        if not parent.resolve().is_relative_to(self.store.resolve()) or not os.access(
            parent, os.W_OK | os.X_OK
        ):
            raise FailedPrecondition(
                f"the server cannot write adapter {adapter_id!r} into its store ({parent})"
            )

    def _check_quota(self, tenant: str) -> None:
        """Queued, running and being-created jobs against the server's and the tenant's limits."""
        tenants = [r.tenant for r in self._active()] + list(self._preparing.values())
        if len(tenants) >= self.config.training_max_queued_jobs:
            raise ResourceExhausted(
                f"the training queue is full ({len(tenants)} jobs; --training-max-queued-jobs): retry later"
            )
        mine = tenants.count(tenant)
        if mine >= self.config.training_max_jobs_per_tenant:
            raise ResourceExhausted(
                f"tenant {tenant or 'anonymous'!r} already has {mine} training job(s) queued or running "
                "(--training-max-jobs-per-tenant)"
            )

    # ------------------------------------------------------------------ engine events
    def _make_run(self, spec: TrainingSpec) -> TrainingRun:
        """Engine thread: a job's compute; the base's layout may change (see TrainingRun)."""
        run = TrainingRun.on_engine(spec, self.engine, self.config.training_micro_batch_tokens)
        if run.layout_changed:
            self.engine.prefix_cache.new_layout()
        return run

    def _restore_layout(self) -> None:
        """Engine thread, once no job is left: serving's own weight layout back."""
        if restore_inference_layout(self.engine.loaded.model):
            self.engine.prefix_cache.new_layout()

    def _report(self, job_id: str, event: Event) -> None:
        """From the engine's thread: applied on the event loop, in order."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
            loop.call_soon_threadsafe(self._apply, job_id, event)

    def _apply(self, job_id: str, event: Event) -> None:
        record = self.table.records.get(job_id)
        if record is None:
            return
        if event.kind == "started":
            record.state, record.started = JobState.RUNNING, time.time()
            self.table.save()
            self._count_states()
        elif event.kind == "progress":
            self._progress(record, event)
        elif event.kind == "failed":
            return self._finish(record, JobState.FAILED, event.error)
        elif event.kind == "cancelled":
            return self._finish(record, JobState.CANCELLED, "")
        elif event.kind == "written":
            self._progress(record, event)
            task = asyncio.ensure_future(self._register(record, event))
            self._tasks.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._tasks.discard)
            return None
        self._publish(record)
        return None

    def _progress(self, record: JobRecord, event: Event) -> None:
        progress = event.progress
        steps_done = progress.step - record.step
        record.step, record.loss, record.tokens_trained = progress.step, progress.loss, progress.tokens
        record.eval_exact_match = progress.eval_exact_match
        if self.metrics is not None:
            if steps_done > 0:
                self.metrics.training_steps.inc(steps_done)
            if event.step_seconds > 0:
                self.metrics.training_step_seconds.observe(event.step_seconds)
            if event.tokens:
                self.metrics.training_tokens.inc(event.tokens)

    async def _register(self, record: JobRecord, event: Event) -> None:
        """Serves the written adapter (a reload if it replaced one), then the job is done. The
        adapter is in the store whatever happens here: if no device slot can take it now (all
        pinned or busy), the job still succeeds and the first request loads it."""
        served = "served"
        try:
            await self.admin.load(record.adapter_id)
        except Exception as error:  # noqa: BLE001 - logged; the store has the adapter
            log.warning(
                "training job %s: adapter %s not loaded now: %s", record.job_id, record.adapter_id, error
            )
            served = "loaded by its first request"
        log.info(
            "training job %s succeeded: adapter %s written in %.1f s and %s (held-out exact match %s)",
            record.job_id,
            record.adapter_id,
            event.seconds,
            served,
            "n/a" if record.eval_exact_match is None else f"{record.eval_exact_match:.0%}",
        )
        self._finish(record, JobState.SUCCEEDED, "")

    def _finish(self, record: JobRecord, state: JobState, error: str) -> None:
        record.state, record.error, record.finished = state, error, time.time()
        if error:
            log.warning("training job %s %s: %s", record.job_id, state.value, error)
        self.table.save()
        self._count_states()
        self._publish(record)

    def _publish(self, record: JobRecord) -> None:
        """Hands each watcher the latest snapshot; one that has not read the previous one gets
        this one instead (a slow reader skips steps, it never piles them up)."""
        snapshot = record.copy()
        for queue in self._watchers.get(record.job_id, ()):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(snapshot)

    def _count_states(self) -> None:
        if self.metrics is None:
            return
        counts = dict.fromkeys(JobState, 0)
        for record in self.table.records.values():
            counts[record.state] += 1
        for state, count in counts.items():
            self.metrics.training_jobs.labels(state.value).set(count)
