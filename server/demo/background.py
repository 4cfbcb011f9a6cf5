"""The server's side of the first run: train the demo adapters in a child process, hot-load each.

All tensor work of the server process runs on the engine's thread; training on another thread
of the same process would slow every engine step (the two fight over the same cores and the
GIL). So the trainer is a child process, `loraserve demo --background` (lower CPU priority,
progress lines on the server's terminal), which writes each adapter into the demo's store
atomically and keeps a status file current. This side polls that file (off the event loop),
keeps the `TrainingSchedule` that answers requests for adapters not written yet, and loads
each adapter onto the device the moment the trainer reports it written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from typing import Any

from loraserve.demo.schedule import TrainingSchedule
from loraserve.demo.status import READY, AdapterProgress, TrainingStatus, read_status
from loraserve.demo.tenants import DEFAULT_SECONDS_PER_STEP, TenantsBuild, plan

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0
# Before the child has timed a step: loading the base model and the first step's warm-up.
STARTUP_ESTIMATE_SECONDS = 60.0


def initial_status(missing: list[str]) -> TrainingStatus:
    """The estimate until the child writes its own: every missing adapter queued, in order."""
    status = TrainingStatus(adapters={})
    ahead = STARTUP_ESTIMATE_SECONDS
    for tenant in plan():
        if tenant.adapter_id in missing:
            ahead += tenant.steps * DEFAULT_SECONDS_PER_STEP
            status.adapters[tenant.adapter_id] = AdapterProgress(steps=tenant.steps, eta_seconds=ahead)
            ahead += tenant.max_new_tokens * 0.3 * DEFAULT_SECONDS_PER_STEP
    status.updated = time.time()
    return status


class DemoTraining:
    """One child trainer and the schedule it feeds; hot-loads through the admin verbs."""

    def __init__(self, build: TenantsBuild, admin: Any, command: list[str] | None = None) -> None:
        self.build = build
        self.admin = admin
        self.missing = build.missing()
        self.schedule = TrainingSchedule(initial_status(self.missing))
        self.command = command or [
            sys.executable,
            "-m",
            "loraserve.cli",
            "demo",
            "--background",
            "--cache-dir",
            str(build.root.parent),
        ]
        self.process: subprocess.Popen | None = None
        self.task: asyncio.Task | None = None
        self.loaded: list[str] = []

    def start(self) -> None:
        """Starts the child and the polling task (on the running event loop)."""
        log.info(
            "demo adapters not built yet: training %s in the background (one after another, "
            "each served as soon as it is written); requests for them get UNAVAILABLE until then",
            ", ".join(self.missing),
        )
        # stdout and stderr are the server's: the child's progress lines show in its terminal.
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        self.task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        assert self.process is not None
        ready_before = set()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            status = await asyncio.to_thread(read_status, self.build.status_file)
            if status is not None and status.pid == self.process.pid:  # not a stale file
                self.schedule.update(status)
                for adapter_id, progress in status.adapters.items():
                    if progress.state == READY and adapter_id not in ready_before:
                        ready_before.add(adapter_id)
                        await self._hot_load(adapter_id)
            code = self.process.poll()
            if code is not None:
                if code != 0:
                    left = self.schedule.pending()
                    log.error(
                        "demo trainer exited with status %d; not built: %s (run `loraserve demo` to see why)",
                        code,
                        ", ".join(left) or "-",
                    )
                self.schedule.update(None)
                return

    async def _hot_load(self, adapter_id: str) -> None:
        try:
            outcome = await self.admin.load(adapter_id)
        except Exception as error:  # noqa: BLE001 - a request would load it lazily anyway
            log.warning("demo adapter %s was written but could not be loaded: %s", adapter_id, error)
            return
        self.loaded.append(adapter_id)
        log.info("hot-loaded demo adapter %s (%.2f s): it is served now", adapter_id, outcome.load_seconds)

    def stop(self) -> None:
        """Stops the child (its unfinished adapter is left unwritten) and the polling task."""
        if self.task is not None:
            self.task.cancel()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def maybe_start(build: TenantsBuild, admin: Any) -> DemoTraining | None:
    """Starts background training when some demo adapter is missing; None when all are built."""
    if not build.missing():
        return None
    training = DemoTraining(build, admin)
    training.start()
    return training


def in_background() -> None:
    """Called in the child before any tensor work: below the server's priority, and one core
    fewer than the machine has (one thread on two cores), so serving stays responsive."""
    import torch

    with contextlib.suppress(OSError):
        os.nice(10)  # before torch starts its worker threads: they inherit it
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
