"""The multi-turn chat scenario: prefix caching on vs off, in one run.

N tenants, each with its own adapter and its own 256-token system prompt. Conversations arrive
as a Poisson process, each on one tenant (round robin), and run 5 turns: every turn resends the
whole history (system prompt, earlier user messages and the answers the engine gave) plus a
new user message, as a chat client does, and the next turn is sent when the answer is complete.
The same conversations run on two engines that differ only in `enable_prefix_caching`; the
report gives TTFT p50/p99 and throughput of each, and the ratios (goal: TTFT p50 at least 3x
lower with the cache, throughput not lower).
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from loraserve.benchmarks.models import BenchAssets
from loraserve.benchmarks.report import summarize
from loraserve.benchmarks.systems import Record
from loraserve.engine.sequence import GenerationRequest, StoppingCriteria

PRESET: dict[str, Any] = {
    "tenants": 4,
    "conversations": 12,
    "turns": 5,
    "system_len": 256,
    "user_len": (16, 32),
    "output_len": (16, 32),
    "rate": 0.5,  # conversations per second
}
# The tiny model (smoke tests) has a 512-token context: shorter prompts, fewer conversations.
TINY = {
    "conversations": 6,
    "turns": 3,
    "system_len": 64,
    "user_len": (4, 8),
    "output_len": (4, 8),
    "rate": 20.0,
}


@dataclass(frozen=True)
class Conversation:
    index: int
    adapter: str
    system: list[int]
    user_turns: list[list[int]]
    answer_lens: list[int]
    start: float  # seconds after the run starts


def make_conversations(adapters: list[str], vocab: int, seed: int, p: dict[str, Any]) -> list[Conversation]:
    """Seeded conversations: one system prompt per tenant (adapter), Poisson starts."""
    rng = random.Random(seed)
    systems = {a: [rng.randint(10, vocab) for _ in range(p["system_len"])] for a in adapters}
    clock, out = 0.0, []
    for i in range(p["conversations"]):
        clock += rng.expovariate(p["rate"])
        adapter = adapters[i % len(adapters)]
        users = [
            [rng.randint(10, vocab) for _ in range(rng.randint(*p["user_len"]))] for _ in range(p["turns"])
        ]
        answers = [rng.randint(*p["output_len"]) for _ in range(p["turns"])]
        out.append(Conversation(i, adapter, systems[adapter], users, answers, clock))
    return out


def longest_history(conversations: list[Conversation]) -> int:
    return max(len(c.system) + sum(map(len, c.user_turns)) + sum(c.answer_lens) for c in conversations)


@dataclass
class Turn:
    record: Record
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


def run_turn(engine: Any, conv: Conversation, k: int, history: list[int]) -> tuple[Turn, list[int]]:
    """Sends one turn (the whole history so far) and waits for its answer: (its Turn, the answer)."""
    wanted = conv.answer_lens[k]
    turn = Turn(Record(conv.index * 100 + k, conv.adapter, wanted=wanted), len(history))
    answer: list[int] = []
    done = threading.Event()

    def sink(output: Any) -> None:
        now = time.perf_counter()
        turn.record.token_times.extend([now] * len(output.token_ids))
        answer.extend(output.token_ids)
        if output.done:
            turn.record.finish = now
            turn.cached_prompt_tokens = output.cached_prompt_tokens
            if output.error is not None:
                turn.record.error = f"{type(output.error).__name__}: {output.error}"
            done.set()

    turn.record.arrival = time.perf_counter()
    request = GenerationRequest(
        f"chat-{conv.index}-{k}",
        list(history),
        stopping=StoppingCriteria(max_new_tokens=wanted, ignore_eos=True, max_time_seconds=3600),
        adapter_id=conv.adapter,
    )
    try:
        engine.submit(request, sink)
    except Exception as error:  # noqa: BLE001 - counted as an error of this turn
        turn.record.error = f"{type(error).__name__}: {error}"
        turn.record.finish = time.perf_counter()
        done.set()
    done.wait()
    return turn, answer


def run_conversations(engine: Any, conversations: list[Conversation]) -> list[Turn]:
    """Drives every conversation on its own thread from its start time; one Turn per request."""
    turns: list[Turn] = []
    lock = threading.Lock()
    started = time.perf_counter()

    def converse(conv: Conversation) -> None:
        delay = started + conv.start - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        history = list(conv.system)
        for k, user in enumerate(conv.user_turns):
            history += user
            turn, answer = run_turn(engine, conv, k, history)
            with lock:
                turns.append(turn)
            if turn.record.error is not None:
                return
            history += answer

    threads = [threading.Thread(target=converse, args=(c,), name=f"chat-{c.index}") for c in conversations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return turns


def chat_engine(bench: Any, assets: BenchAssets, conversations: list[Conversation], caching: bool) -> Any:
    """An engine for the scenario, its KV pool big enough for every conversation's whole history
    (so the comparison is about prefill, not memory pressure), warmed up on every adapter."""
    from loraserve.engine.engine import Engine, EngineConfig
    from loraserve.engine.kv_sizing import KVGeometry
    from loraserve.model_loader import load_base_model

    adapters = sorted({c.adapter for c in conversations})

    def build() -> tuple[Any, EngineConfig]:
        loaded = load_base_model(str(assets.model_dir), bench.args.quantization, bench.device, "auto")
        block_size = EngineConfig.block_size
        blocks = len(conversations) * (math.ceil(longest_history(conversations) / block_size) + 1) + 8
        per_block = KVGeometry.of(loaded.model.config).bytes_per_block(block_size, loaded.dtype)
        config = EngineConfig(
            adapters_dir=assets.store,
            max_loaded_adapters=max(1, len(adapters)),
            max_lora_rank=bench.args.rank,
            max_num_seqs=64,
            max_num_batched_tokens=bench.args.max_num_batched_tokens,
            block_size=block_size,
            kv_cache_bytes=blocks * per_block,
            max_queue_size=10_000,
            max_queue_per_tenant=10_000,
            enable_prefix_caching=caching,
        )
        return loaded, config

    engine = Engine.spawn(build, warmup=True).result()
    # Adapters on the device before timing; short prompts that share nothing with the workload.
    warm = [Conversation(-1 - i, a, [11, 12, 13], [[14]], [1], 0.0) for i, a in enumerate(adapters)]
    run_conversations(engine, warm)
    return engine


def scenario_chat(bench: Any) -> dict[str, Any]:
    """Multi-turn chat over N tenants' adapters and system prompts, prefix cache on vs off."""
    p = {**PRESET, **(TINY if bench.args.model_size == "tiny" else {})}
    assets = bench.assets(p["tenants"])
    vocab = 360 if bench.args.model_size == "tiny" else 30000
    conversations = make_conversations(assets.adapter_ids[: p["tenants"]], vocab, bench.args.seed, p)
    systems: dict[str, dict[str, Any]] = {}
    for name, caching in (("engine-cache-on", True), ("engine-cache-off", False)):
        if not bench.args.quiet:
            print(f"   {name}", flush=True)
        engine = chat_engine(bench, assets, conversations, caching)
        try:
            turns = run_conversations(engine, conversations)
        finally:
            engine.shutdown()
        summary = summarize([t.record for t in turns])
        summary["prompt_tokens"] = sum(t.prompt_tokens for t in turns)
        summary["cached_prompt_tokens"] = sum(t.cached_prompt_tokens for t in turns)
        systems[name] = summary
    on, off = systems["engine-cache-on"], systems["engine-cache-off"]
    ttft_p50 = _ratio(off["ttft_seconds"]["p50"], on["ttft_seconds"]["p50"])
    throughput = _ratio(on["throughput_tokens_per_s"], off["throughput_tokens_per_s"])
    return {
        "preset": p,
        "workload": {
            "conversations": len(conversations),
            "requests": len(conversations) * p["turns"],
            "tenants": p["tenants"],
            "longest_history_tokens": longest_history(conversations),
        },
        "systems": systems,
        "ratios": {
            "ttft_p50_off/on": ttft_p50,
            "ttft_p99_off/on": _ratio(off["ttft_seconds"]["p99"], on["ttft_seconds"]["p99"]),
            "throughput_on/off": throughput,
        },
        "goal": {
            "description": f"{p['conversations']} {p['turns']}-turn conversations over {p['tenants']} "
            f"tenants (own adapter, {p['system_len']}-token system prompt), Poisson at {p['rate']:g}/s: "
            "TTFT p50 with the prefix cache off / on",
            "target": 3.0,
            "measured": ttft_p50,
            "met": ttft_p50 is not None and ttft_p50 >= 3.0,
        },
        "throughput_goal": {
            "description": "throughput with the prefix cache on / off",
            "target": 1.0,
            "measured": throughput,
            "met": throughput is not None and throughput >= 1.0,
        },
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None
