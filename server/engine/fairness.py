"""Fair sharing between tenants: S-LoRA's Virtual Token Counter (Sheng et al., 2024).

Each tenant has a counter of the service it received, in weighted tokens divided by its
share weight (prompt tokens count 1, generated tokens 2: decoding costs more per token).
The scheduler admits from the backlogged tenant with the smallest counter. A tenant that
comes back after idling is lifted to the smallest counter among the backlogged ones, so
idle time banks no credit and a flood from one tenant cannot starve another.
"""

from __future__ import annotations

from collections.abc import Iterable

PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0


class VirtualTokenCounter:
    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.weights = dict(weights or {})
        self.counters: dict[str, float] = {}

    def activate(self, tenant: str, backlogged: Iterable[str]) -> None:
        """Called when `tenant` gets work while it had none queued or running."""
        others = [self.counters.get(t, 0.0) for t in backlogged if t != tenant]
        floor = min(others) if others else max(self.counters.values(), default=0.0)
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)

    def charge(self, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        cost = prompt_tokens * PROMPT_WEIGHT + output_tokens * OUTPUT_WEIGHT
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / self.weights.get(tenant, 1.0)

    def order(self, tenants: Iterable[str]) -> list[str]:
        """Tenants from least to most served (ties: by name, for determinism)."""
        return sorted(tenants, key=lambda t: (self.counters.get(t, 0.0), t))
