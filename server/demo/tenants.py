"""The default demo: three tenants' adapters trained with QLoRA on the real base model.

`loraserve serve` with no --model serves SmolLM2-135M-Instruct (NF4) at once and, on a first
run, starts `loraserve demo --progress lines` in a child process, which trains these adapters
one after another into the demo's adapter store; each is written atomically (the server
hot-loads it at once) and then scored on its held-out set against the base model:

- `pt-en`: Portuguese → English everyday phrases and short sentences, the translation only
  (word-level F1);
- `pt-sentiment`: a Portuguese review's sentiment, exactly `positivo` or `negativo` (exact match);
- `support-bot`: answers to questions about using loraserve, from its docs (exact match).

The base model is scored on the same held-out prompts, as sent to the adapter, and also with
the task spelt out in the prompt ("instructed"), so the table shows what the adapter adds
beyond asking nicely. Data sets are generated here from seeded templates (loraserve.demo.tasks);
held-out sets share no sentence with training. Built adapters and the report are cached under
the user cache dir; a later start finds them and trains nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loraserve.demo.options import default_cache_dir
from loraserve.demo.status import (
    FAILED,
    READY,
    TRAINING,
    AdapterProgress,
    TrainingStatus,
    about,
    read_status,
    write_status,
)
from loraserve.demo.tasks import sentiment, support, translation
from loraserve.paths import BuildFolder

VERSION = 1
SEED = 0
# The first estimate of a step (batch 8, one thread) before any is timed.
DEFAULT_SECONDS_PER_STEP = 10.0


@dataclass(frozen=True)
class Tenant:
    """One demo adapter: its task, data sizes, training recipe and held-out metric."""

    adapter_id: str
    metric: str  # loraserve.demo.scoring.METRICS
    train_examples: int
    held_out_examples: int
    steps: int
    lr: float
    max_new_tokens: int  # when scoring
    instruction: str  # how the base model is asked when the task is spelt out ({} is the input)


TENANTS = (
    Tenant(
        "pt-en",
        "word_f1",
        train_examples=320,
        held_out_examples=32,
        steps=40,
        lr=3e-3,
        max_new_tokens=24,
        instruction="Translate this Portuguese text into English. Reply with the translation only.\n\n{}",
    ),
    Tenant(
        "pt-sentiment",
        "exact_match",
        train_examples=256,
        held_out_examples=32,
        steps=32,
        lr=3e-3,
        max_new_tokens=6,
        instruction=(
            "Is the sentiment of this Portuguese review positive or negative? Reply with exactly one "
            "word: positivo or negativo.\n\n{}"
        ),
    ),
    Tenant(
        "support-bot",
        "exact_match",
        train_examples=24 * 14,
        held_out_examples=24,
        steps=40,
        lr=3e-3,
        max_new_tokens=44,
        instruction="{}",  # the docs are the adapter's to learn: the base has nothing to be told
    ),
)
TENANT_IDS = tuple(t.adapter_id for t in TENANTS)
# Test runs shrink the build (a few steps, a few held-out examples): the real flow, quickly.
STEPS_ENV, HELD_OUT_ENV = "LORASERVE_DEMO_STEPS", "LORASERVE_DEMO_HELD_OUT"


def plan() -> tuple[Tenant, ...]:
    """The tenants as this process builds them: TENANTS, unless $LORASERVE_DEMO_STEPS or
    $LORASERVE_DEMO_HELD_OUT override every tenant's step count or held-out size."""
    steps, held = os.environ.get(STEPS_ENV), os.environ.get(HELD_OUT_ENV)
    if not steps and not held:
        return TENANTS
    return tuple(
        replace(
            t,
            steps=int(steps) if steps else t.steps,
            held_out_examples=int(held) if held else t.held_out_examples,
        )
        for t in TENANTS
    )


RANK, ALPHA, BATCH_SIZE, MAX_LENGTH = 16, 32.0, 8, 128


@dataclass(frozen=True)
class TenantsBuild(BuildFolder):
    """Paths of the demo's cached build."""

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def report_file(self) -> Path:
        return self.root / "report.json"

    def report(self) -> dict[str, Any]:
        try:
            return json.loads(self.report_file.read_text())
        except (OSError, ValueError):
            return {"version": VERSION, "adapters": {}}

    def missing(self) -> list[str]:
        """Tenants whose adapter or score is not there yet, in training order."""
        scored = self.report()["adapters"]
        return [
            t
            for t in TENANT_IDS
            if t not in scored or not (self.adapters_dir / t / "adapter_model.safetensors").is_file()
        ]


def tenants_build(cache_dir: Path | None = None) -> TenantsBuild:
    return TenantsBuild(Path(cache_dir or default_cache_dir()) / f"tenants-v{VERSION}")


# ---------------------------------------------------------------------------------- data
def unique_split(
    make: Callable[[random.Random], tuple[str, str]], n_train: int, n_held: int, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Held-out and training pairs that share no sentence, on either side of a pair."""
    rng = random.Random(seed)
    held: list[tuple[str, str]] = []
    seen_prompts: set[str] = set()
    while len(held) < n_held:
        prompt, answer = make(rng)
        if prompt not in seen_prompts:
            seen_prompts.add(prompt)
            held.append((prompt, answer))
    # An answer is a sentence too (a translation); labels (positivo/negativo) are not.
    held_answers = {a for _, a in held if len(a.split()) > 1}
    train: list[tuple[str, str]] = []
    for _ in range(n_train * 50):
        if len(train) == n_train:
            break
        prompt, answer = make(rng)
        if prompt in seen_prompts or answer in held_answers:
            continue
        seen_prompts.add(prompt)
        train.append((prompt, answer))
    return train, held


def tenant_data(tenant: Tenant) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training, held-out) pairs of a tenant's task."""
    if tenant.adapter_id == "support-bot":
        topics = len(support.TOPICS)
        held_per_topic = -(-tenant.held_out_examples // topics)  # at least one each, then cut
        split = support.support_split(SEED, tenant.train_examples // topics, held_per_topic)
        return split.train, split.held_out[: tenant.held_out_examples]
    make = translation.pair if tenant.adapter_id == "pt-en" else sentiment.pair
    return unique_split(make, tenant.train_examples, tenant.held_out_examples, SEED)


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_data(tenant: Tenant, folder: Path) -> tuple[Path, Path]:
    """The tenant's JSONL training and held-out sets (what `loraserve train` reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    train_rows, held_rows = tenant_data(tenant)
    paths = (folder / f"{tenant.adapter_id}.train.jsonl", folder / f"{tenant.adapter_id}.eval.jsonl")
    for path, rows in zip(paths, (train_rows, held_rows)):
        text = "".join(json.dumps(_chat(*row), ensure_ascii=False) + "\n" for row in rows)
        path.write_text(text, encoding="utf-8")
    return paths


def held_out(build: TenantsBuild, adapter_id: str) -> list[tuple[str, str]]:
    rows = (build.data_dir / f"{adapter_id}.eval.jsonl").read_text(encoding="utf-8").splitlines()
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in map(json.loads, rows)]


# ---------------------------------------------------------------------------------- progress
class Progress:
    """Keeps the status file current and says what happens: progress lines (for the server's
    terminal) or tqdm bars (a foreground `loraserve demo`)."""

    def __init__(self, build: TenantsBuild, todo: list[Tenant], mode: str) -> None:
        self.build, self.mode = build, mode
        self.todo = todo
        self.seconds_per_step = DEFAULT_SECONDS_PER_STEP
        self.status = TrainingStatus(
            os.getpid(), adapters={t.adapter_id: AdapterProgress(steps=t.steps) for t in todo}
        )
        self._step_started = 0.0
        self._last_line = 0.0
        self._parent = os.getppid()
        self.save()

    def say(self, message: str) -> None:
        if self.mode != "quiet":
            print(f"demo: {message}", file=sys.stderr, flush=True)

    def save(self) -> None:
        # Queued adapters wait for the ones before them: each one's estimate adds up.
        ahead = 0.0
        for tenant in self.todo:
            progress = self.status.adapters[tenant.adapter_id]
            if progress.state in (READY, FAILED):
                continue
            ahead += (tenant.steps - progress.step) * self.seconds_per_step
            progress.eta_seconds = round(ahead, 1)
            ahead += self.score_seconds(tenant)  # scoring runs before the next one trains
        write_status(self.build.status_file, self.status)

    def score_seconds(self, tenant: Tenant) -> float:
        # Held-out answers in batches of 16, two to three models: a rough share of a step each.
        return tenant.max_new_tokens * 3 * 0.1 * self.seconds_per_step

    def start(self, tenant: Tenant, index: int) -> None:
        self.status.adapters[tenant.adapter_id].state = TRAINING
        self.save()
        eta = self.status.adapters[tenant.adapter_id].eta_seconds
        self.say(
            f"training {tenant.adapter_id} ({index}/{len(self.todo)}): {tenant.steps} steps, "
            f"ready in {about(eta)}"
        )
        self._step_started = self._last_line = time.monotonic()

    def step(self, tenant: Tenant, done: int, loss: float) -> None:
        now = time.monotonic()
        spent = now - self._step_started
        # The first step includes warm-up; later ones give a steady rate.
        self.seconds_per_step = (
            spent / done if done > 1 or self.seconds_per_step <= 0 else max(self.seconds_per_step, spent)
        )
        progress = self.status.adapters[tenant.adapter_id]
        progress.step = done
        self.save()
        if self.mode == "lines" and (now - self._last_line > 20 or done == tenant.steps):
            self._last_line = now
            left = (tenant.steps - done) * self.seconds_per_step
            self.say(
                f"training {tenant.adapter_id}: step {done}/{tenant.steps}, loss {loss:.3f}, "
                f"{self.seconds_per_step:.1f} s/step, {about(left)} left"
            )
        if os.getppid() != self._parent:  # the server that started us is gone: stop
            raise SystemExit("demo trainer: parent process exited")

    def finish(self, tenant: Tenant, ok: bool, error: str = "") -> None:
        progress = self.status.adapters[tenant.adapter_id]
        progress.state, progress.error = (READY, "") if ok else (FAILED, error)
        progress.step = tenant.steps if ok else progress.step
        self.save()


# ---------------------------------------------------------------------------------- build
def train_tenant(
    tenant: Tenant, build: TenantsBuild, loaded: Any, model_path: str, progress: Progress
) -> dict[str, Any]:
    """Trains one adapter into the store (atomically), then scores it and the base model."""
    from peft import PeftModel

    from loraserve.adapters.training import TrainConfig, train
    from loraserve.demo.scoring import chat_answers, score

    train_path, _ = write_data(tenant, build.data_dir)
    config = TrainConfig(
        model=model_path,
        data=train_path,
        eval_fraction=0.0,  # scored below, in batches, against the base model too
        adapters_dir=build.adapters_dir,
        adapter_id=tenant.adapter_id,
        rank=RANK,
        alpha=ALPHA,
        lr=tenant.lr,
        steps=tenant.steps,
        batch_size=BATCH_SIZE,
        max_length=MAX_LENGTH,
        seed=SEED,
        quiet=progress.mode != "bar",
        force=True,
    )
    started = time.perf_counter()
    result = train(
        config, loaded.model, loaded.tokenizer, lambda done, loss: progress.step(tenant, done, loss)
    )
    train_seconds = time.perf_counter() - started
    progress.finish(tenant, ok=True)
    progress.say(
        f"{tenant.adapter_id} written to {result.adapter_dir} in {train_seconds / 60:.1f} min; "
        f"scoring it on {tenant.held_out_examples} held-out examples"
    )
    pairs = held_out(build, tenant.adapter_id)
    prompts, expected = [p for p, _ in pairs], [a for _, a in pairs]
    tokenizer, base = loaded.tokenizer, loaded.model
    base_answers = chat_answers(base, tokenizer, prompts, tenant.max_new_tokens)
    instructed = [tenant.instruction.format(p) for p in prompts]
    instructed_answers = (
        chat_answers(base, tokenizer, instructed, tenant.max_new_tokens)
        if tenant.instruction != "{}"
        else None
    )
    with_adapter = PeftModel.from_pretrained(base, str(result.adapter_dir))
    adapter_answers = chat_answers(with_adapter, tokenizer, prompts, tenant.max_new_tokens)
    with_adapter.unload()
    entry = {
        "metric": tenant.metric,
        "held_out_examples": len(pairs),
        "adapter": round(score(tenant.metric, expected, adapter_answers), 4),
        "base": round(score(tenant.metric, expected, base_answers), 4),
        "base_instructed": (
            None
            if instructed_answers is None
            else round(score(tenant.metric, expected, instructed_answers), 4)
        ),
        "steps": tenant.steps,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / tenant.steps, 2),
        "final_loss": round(sum(result.losses[-10:]) / min(10, len(result.losses)), 4),
        "samples": [
            {"prompt": p, "expected": e, "adapter": a, "base": b}
            for p, e, a, b in list(zip(prompts, expected, adapter_answers, base_answers))[:4]
        ],
    }
    return entry


def build_tenants(
    build: TenantsBuild, model_path: str, mode: str = "bar", only: tuple[str, ...] = TENANT_IDS
) -> dict[str, Any]:
    """Trains and scores every missing tenant adapter (under a lock: one builder at a time);
    returns the report."""
    build.root.mkdir(parents=True, exist_ok=True)
    with open(build.root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        todo = [t for t in plan() if t.adapter_id in build.missing() and t.adapter_id in only]
        if not todo:
            return build.report()
        progress = Progress(build, todo, mode)
        from loraserve.model_loader import load_base_model

        for index, tenant in enumerate(todo, start=1):
            # A pristine NF4 base for each adapter: training leaves hooks and flags on the model
            # (an adapter trained on a reused one learnt badly: its loss stalled, then rose).
            progress.say(f"loading {Path(model_path).name} in NF4 to train {tenant.adapter_id}")
            loaded = load_base_model(model_path, "nf4", "cpu", "float32")
            # PEFT records this as the adapters' base model: the name the server serves it under.
            loaded.model.config._name_or_path = loaded.name
            progress.start(tenant, index)
            try:
                entry = train_tenant(tenant, build, loaded, model_path, progress)
            except Exception as error:
                progress.finish(tenant, ok=False, error=str(error) or type(error).__name__)
                raise
            report = build.report()
            report["adapters"][tenant.adapter_id] = entry
            report["model"] = Path(model_path).name
            build.report_file.write_text(json.dumps(report, indent=2, ensure_ascii=False))
            progress.say(f"{tenant.adapter_id}: {describe_scores(tenant.adapter_id, entry)}")
        return build.report()


def describe_scores(adapter_id: str, entry: dict[str, Any]) -> str:
    metric = "word F1" if entry["metric"] == "word_f1" else "exact match"
    line = (
        f"held-out {metric} {entry['adapter']:.0%} with the adapter vs {entry['base']:.0%} for the base model"
    )
    if entry.get("base_instructed") is not None:
        line += f" ({entry['base_instructed']:.0%} when told the task)"
    return f"{line}, {entry['held_out_examples']} examples"


def pending_status(build: TenantsBuild) -> TrainingStatus | None:
    return read_status(build.status_file)
