"""The training scenario: serving latency while a Training job trains on the same engine.

One engine (the bench model in NF4, 4 adapters) serves the same closed-loop workload in phases:
1. `idle-as-loaded`: no training, the base as loaded;
2. `idle`: no training, the base made trainable first (on CPUs with AVX512-BF16, bitsandbytes'
   packed inference weights have no backward, so the first job unpacks them: this phase is
   the fair baseline for the next ones, and its ratio to phase 1 is the cost of that);
3. `training-<tokens>`: a job trains throughout (synthetic sequences, batch 8, rank 16 on every
   adapted module) under `--training-share` 0.3, for each micro-batch size (the slice length;
   the first is the server's default);
4. `idle-after`: no job left, the base's inference layout restored, as the server does.
The report gives each phase's ITL and TTFT percentiles and throughput, the ratios of ITL p99
with a job training to idle, and the job's optimizer steps per second while serving and alone.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loraserve.benchmarks.report import summarize
from loraserve.training.jobs import JobState
from loraserve.training.run import TrainingRun, make_base_trainable, restore_inference_layout
from loraserve.training.spec import JobOptions, TrainingSpec
from loraserve.training.worker import Event, TrainingWorker

PRESET: dict[str, Any] = {
    "adapters": 4,
    "requests": 48,
    "concurrency": 8,
    "prompt_len": (32, 64),
    "output_len": (32, 64),
    "share": 0.3,
    "micro_batch_tokens": [512, 2048],
    "train_examples": 64,
    "train_length": 128,
    "batch_size": 8,
    "alone_seconds": 20.0,
}
TINY = {
    "requests": 16,
    "output_len": (8, 16),
    "train_length": 32,
    "alone_seconds": 3.0,
    "micro_batch_tokens": [256],
}


def synthetic_spec(modules: list[str], vocab: int, p: dict[str, Any], seed: int) -> TrainingSpec:
    """Random token sequences, the loss on their second half: a job that never converges."""
    rng = random.Random(seed)
    train = []
    for _ in range(p["train_examples"]):
        ids = [rng.randint(10, vocab - 1) for _ in range(p["train_length"])]
        half = len(ids) // 2
        train.append((ids, [-100] * half + ids[half:]))
    options = JobOptions(
        steps=1_000_000,
        rank=16,
        alpha=32.0,
        learning_rate=1e-4,
        batch_size=p["batch_size"],
        max_length=p["train_length"],
        target_modules="all-linear",
        seed=seed,
        eval_fraction=0.0,
    )
    return TrainingSpec("bench/training", "bench", options, modules, train)


class Job:
    """A training job run by a worker on the engine; counts its steps from the events."""

    def __init__(self, engine: Any, micro_batch_tokens: int, share: float, store: Path) -> None:
        self.engine = engine
        self.steps = 0
        self.state = JobState.QUEUED
        self.changed = threading.Condition()

        def make_run(spec: TrainingSpec) -> TrainingRun:
            return TrainingRun.on_engine(spec, engine, micro_batch_tokens)

        self.worker = TrainingWorker(make_run, store, engine.loaded.name, self._report, max_seconds=1e9)
        engine.attach_side_work(self.worker, share)

    def _report(self, job_id: str, event: Event) -> None:
        with self.changed:
            if event.kind == "started":
                self.state = JobState.RUNNING
            elif event.kind == "progress" and event.progress is not None:
                self.steps = event.progress.step
            elif event.kind in ("failed", "cancelled"):
                self.state = JobState.FAILED if event.kind == "failed" else JobState.CANCELLED
                self.error = event.error
            self.changed.notify_all()

    def start(self, spec: TrainingSpec) -> None:
        self.worker.submit("bench", spec)
        self.engine.wake()
        with self.changed:
            if not self.changed.wait_for(lambda: self.steps >= 1 or self.state.done, timeout=600):
                raise TimeoutError("the benchmark's training job did not make a first step")
        if self.state.done:
            raise RuntimeError(f"the benchmark's training job ended: {getattr(self, 'error', '')}")

    def stop(self) -> None:
        self.worker.cancel("bench")
        self.engine.wake()
        with self.changed:
            self.changed.wait_for(lambda: self.state.done, timeout=600)
        self.engine.side_work = None


def scenario_training(bench: Any) -> dict[str, Any]:
    p = {**PRESET, **(TINY if bench.args.model_size == "tiny" else {})}
    assets = bench.assets(p["adapters"])
    adapters = assets.adapter_ids[: p["adapters"]]
    requests = bench.workload(
        adapters,
        requests=p["requests"],
        workload="closed",
        concurrency=p["concurrency"],
        prompt_len=p["prompt_len"],
        output_len=p["output_len"],
        popularity="uniform",
    )
    engine = bench.engine(assets, len(adapters), requests, p["concurrency"])
    vocab = 360 if bench.args.model_size == "tiny" else 30000
    systems: dict[str, dict[str, Any]] = {}
    training: dict[str, dict[str, Any]] = {}
    try:
        bench.warm_adapters(engine, adapters)

        def serve(label: str) -> dict[str, Any]:
            records = bench.run_engine(engine, requests, "closed", p["concurrency"], label=label)
            return summarize(records)

        serve("warm-up")  # first-call costs (kernel choices, allocator growth) out of every phase
        systems["idle-as-loaded"] = serve("idle-as-loaded")
        make_base_trainable(engine.loaded.model)  # the engine is idle between phases
        systems["idle"] = serve("idle")
        spec = synthetic_spec(list(engine.slots.layers), vocab, p, bench.args.seed)
        with tempfile.TemporaryDirectory() as store:
            for tokens in p["micro_batch_tokens"]:
                label = f"training-{tokens}"
                job = Job(engine, tokens, p["share"], Path(store))
                job.start(spec)
                before, started = job.steps, time.perf_counter()
                systems[label] = serve(label)
                served_seconds = time.perf_counter() - started
                serving_steps = job.steps - before
                share = engine.timeshare.side_fraction
                before, started = job.steps, time.perf_counter()
                time.sleep(p["alone_seconds"])  # the job alone: all of the engine's time
                alone_steps, alone_seconds = job.steps - before, time.perf_counter() - started
                job.stop()
                restore_inference_layout(engine.loaded.model)  # what the server does when no job is left
                training[label] = {
                    "micro_batch_tokens": tokens,
                    "steps_per_s_while_serving": serving_steps / served_seconds,
                    "steps_per_s_alone": alone_steps / alone_seconds,
                    "engine_time_share_measured": share,
                }
        systems["idle-after"] = serve("idle-after")
    finally:
        engine.shutdown()
    idle = systems["idle"]
    ratios = {
        "itl_p99_idle/as-loaded": _ratio(_itl(idle, "p99"), _itl(systems["idle-as-loaded"], "p99")),
        "itl_p50_idle/as-loaded": _ratio(_itl(idle, "p50"), _itl(systems["idle-as-loaded"], "p50")),
        "itl_p50_idle-after/as-loaded": _ratio(
            _itl(systems["idle-after"], "p50"), _itl(systems["idle-as-loaded"], "p50")
        ),
        "throughput_as-loaded/idle": _ratio(
            systems["idle-as-loaded"]["throughput_tokens_per_s"], idle["throughput_tokens_per_s"]
        ),
    }
    for label in training:
        s = systems[label]
        ratios[f"itl_p99_{label}/idle"] = _ratio(_itl(s, "p99"), _itl(idle, "p99"))
        ratios[f"itl_p50_{label}/idle"] = _ratio(_itl(s, "p50"), _itl(idle, "p50"))
        ratios[f"throughput_idle/{label}"] = _ratio(
            idle["throughput_tokens_per_s"], s["throughput_tokens_per_s"]
        )
    return {
        "preset": p,
        "workload": {"requests": len(requests), "adapters": len(adapters), "concurrency": p["concurrency"]},
        "systems": systems,
        "training": training,
        "ratios": ratios,
        "goal": {
            "description": f"serving ITL p99 while a job trains under --training-share {p['share']} / idle, "
            f"at the default slice ({p['micro_batch_tokens'][0]} tokens); reported, no target",
            "target": None,
            "measured": ratios.get(f"itl_p99_training-{p['micro_batch_tokens'][0]}/idle"),
            "met": None,
        },
    }


def _itl(summary: dict[str, Any], q: str) -> float | None:
    return summary["inter_token_latency_seconds"][q]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None
