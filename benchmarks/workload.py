"""S-LoRA-style synthetic workloads: arrivals, adapter popularity, prompt and output lengths.

Closed loop: `concurrency` clients, each sending its next request when the previous ends
(arrival offsets are all 0; the driver enforces the loop). Open loop: Poisson arrivals at rate
λ. Adapter popularity: uniform, power-law with exponent alpha (S-LoRA's skewed tenants), or
distinct (request i on adapter i: every request its own adapter). Prompts are random token ids.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    index: int
    adapter: str  # "" = base model
    prompt_ids: list[int]
    max_new_tokens: int
    arrival: float  # seconds after the start (open loop); 0 in a closed loop
    prompt_text: str = ""  # the prompt as text, for systems reached over gRPC


@dataclass(frozen=True)
class WorkloadSpec:
    requests: int
    adapters: list[str]
    popularity: str = "powerlaw"  # uniform | powerlaw | distinct
    alpha: float = 1.0
    prompt_len: tuple[int, int] = (16, 64)
    output_len: tuple[int, int] = (16, 64)
    workload: str = "closed"  # closed | poisson
    rate: float = 4.0
    concurrency: int = 8
    vocab: tuple[int, int] = (10, 30000)  # token ids drawn from this range
    seed: int = 0


def adapter_weights(count: int, popularity: str, alpha: float) -> list[float]:
    if popularity == "uniform":
        return [1.0] * count
    return [1.0 / (rank + 1) ** alpha for rank in range(count)]  # Zipf: the first adapters are hottest


def make_workload(spec: WorkloadSpec, decode: Callable[[list[int]], str] | None = None) -> list[BenchRequest]:
    rng = random.Random(spec.seed)
    adapters = spec.adapters or [""]
    weights = adapter_weights(len(adapters), spec.popularity, spec.alpha)
    clock = 0.0
    requests = []
    for i in range(spec.requests):
        if spec.popularity == "distinct":
            adapter = adapters[i % len(adapters)]
        else:
            adapter = rng.choices(adapters, weights)[0]
        prompt = [rng.randint(*spec.vocab) for _ in range(rng.randint(*spec.prompt_len))]
        if spec.workload == "poisson":
            clock += rng.expovariate(spec.rate)
        text = decode(prompt) if decode is not None else ""
        requests.append(BenchRequest(i, adapter, prompt, rng.randint(*spec.output_len), clock, text))
    return requests


def with_adapter(requests: list[BenchRequest], adapter: str) -> list[BenchRequest]:
    """The same requests on one adapter (e.g. "" for the base-model ceiling)."""
    return [
        BenchRequest(r.index, adapter, r.prompt_ids, r.max_new_tokens, r.arrival, r.prompt_text)
        for r in requests
    ]
