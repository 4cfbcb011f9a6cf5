"""Every Prometheus metric of loraserve, in its own registry, and the /metrics endpoint.

Names follow docs/api.md (prefix `loraserve_`, base units, `_total` on counters). Adapter ids
appear as label values only for the top `metrics_max_adapter_labels` adapters by traffic;
the rest share `__other__`, so a thousand adapters cannot blow up cardinality.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter as CountMap

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from loraserve.ids import BASE

PREFIX = "loraserve"
OTHER = "__other__"

# Latency buckets from 1 ms to 10 min: a token on a GPU up to a long generation on a CPU.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AdapterLabels:
    """Maps adapter ids to bounded label values: the top `limit` ids by request count.

    An id is promoted when its count passes the smallest labelled count; the id it displaces
    goes back to `__other__` and its series are removed (`on_demote`), so at most `limit`
    adapter label values (plus `__other__` and `__base__`) exist at any time.
    """

    def __init__(self, limit: int, on_demote: callable | None = None) -> None:  # type: ignore[valid-type]
        self.limit = limit
        self.counts: CountMap[str] = CountMap()
        self.labelled: set[str] = set()
        self.on_demote = on_demote
        self._lock = threading.Lock()

    def observe(self, adapter_id: str) -> str:
        """Counts one request for the adapter and returns its label."""
        if not adapter_id:
            return BASE
        with self._lock:
            self.counts[adapter_id] += 1
            if adapter_id in self.labelled:
                return adapter_id
            if len(self.labelled) < self.limit:
                self.labelled.add(adapter_id)
                return adapter_id
            if self.limit == 0:
                return OTHER
            weakest = min(self.labelled, key=lambda a: (self.counts[a], a))
            if self.counts[adapter_id] > self.counts[weakest]:
                self.labelled.discard(weakest)
                self.labelled.add(adapter_id)
                if self.on_demote is not None:
                    self.on_demote(weakest)
                return adapter_id
            return OTHER

    def label(self, adapter_id: str) -> str:
        """The current label of an id, without counting a request."""
        if not adapter_id:
            return BASE
        with self._lock:
            return adapter_id if adapter_id in self.labelled else OTHER


class Metrics:
    """All metrics; one instance per server process (tests make their own)."""

    def __init__(self, max_adapter_labels: int = 20) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def name(n: str) -> str:
            return f"{PREFIX}_{n}"

        # --- requests ---
        self.time_to_first_token = Histogram(
            name("time_to_first_token_seconds"),
            "Time from arrival to the first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            name("inter_token_latency_seconds"),
            "Time between consecutive generated tokens of a request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            name("request_duration_seconds"),
            "Time from arrival to the last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_queue_time = Histogram(
            name("request_queue_time_seconds"),
            "Time from arrival to first being scheduled.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            name("requests"),
            "Finished requests by finish reason and adapter.",
            ["finish_reason", "adapter"],
            registry=r,
        )
        self.request_errors = Counter(
            name("request_errors"),
            "Requests that ended with an error status, by gRPC code.",
            ["code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            name("prompt_tokens"), "Prompt tokens of finished requests.", ["adapter"], registry=r
        )
        self.generation_tokens = Counter(
            name("generation_tokens"), "Generated tokens of finished requests.", ["adapter"], registry=r
        )
        # --- engine ---
        self.requests_running = Gauge(name("requests_running"), "Requests in the running batch.", registry=r)
        self.requests_waiting = Gauge(
            name("requests_waiting"), "Requests waiting to be scheduled.", registry=r
        )
        self.kv_cache_usage = Gauge(
            name("kv_cache_usage_ratio"), "Share of KV-cache blocks in use.", registry=r
        )
        self.batch_size = Histogram(
            name("batch_size"), "Requests in one engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            name("batch_tokens"), "Tokens in one engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_adapters = Histogram(
            name("batch_adapters"),
            "Distinct adapters in one engine step (base model not counted).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            name("engine_step_seconds"),
            "Duration of one engine step (schedule, forward, sample).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preemptions = Counter(
            name("preemptions"), "Running requests preempted (KV recomputed later).", registry=r
        )
        # --- prefix cache ---
        self.prefix_cache_queries = Counter(
            name("prefix_cache_queries"),
            "Tokens of the sequences looked up in the prefix cache when admitted.",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            name("prefix_cache_hits"),
            "Tokens whose KV came from the prefix cache (prefill skipped).",
            registry=r,
        )
        self.prefix_cache_blocks = Gauge(
            name("prefix_cache_blocks"),
            "KV blocks held by no request whose content stays reusable until evicted.",
            registry=r,
        )
        self.prefix_cache_evictions = Counter(
            name("prefix_cache_evictions"),
            "Cached KV blocks dropped: reused for other tokens, or of an unloaded or reloaded adapter.",
            registry=r,
        )
        # --- adapters ---
        self.adapter_slots_used = Gauge(
            name("adapter_slots_used"), "Device slots holding an adapter.", registry=r
        )
        self.adapter_slots_total = Gauge(name("adapter_slots_total"), "Device slots.", registry=r)
        self.adapters_loaded = Gauge(
            name("adapters_loaded"), "Adapters in memory by tier (device, host).", ["tier"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            name("adapter_load_seconds"),
            "Time to read and validate an adapter from disk into host memory.",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapter_loads = Counter(
            name("adapter_loads"),
            "Adapter loads by the tier they came from (disk, host).",
            ["source_tier"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            name("adapter_evictions"),
            "Adapters evicted, by the tier they left (device, host).",
            ["tier"],
            registry=r,
        )
        self.adapter_lookups = Counter(
            name("adapter_lookups"),
            "Scheduling lookups of an adapter: hit (already on device) or miss.",
            ["result"],
            registry=r,
        )
        self.adapter_requests = Counter(
            name("adapter_requests"),
            "Requests accepted per adapter (bounded labels).",
            ["adapter"],
            registry=r,
        )
        self.training_jobs = Gauge(
            name("training_jobs"), "Training jobs in the job table, by state.", ["state"], registry=r
        )
        self.training_steps = Counter(name("training_steps"), "Optimizer steps of training jobs.", registry=r)
        self.training_tokens = Counter(
            name("training_tokens"), "Tokens trained on (forward and backward) by training jobs.", registry=r
        )
        self.training_step_seconds = Histogram(
            name("training_step_seconds"),
            "Wall time of one optimizer step of a training job, serving steps in between included.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60),
            registry=r,
        )

        self.adapter_labels = AdapterLabels(max_adapter_labels, on_demote=self._drop_adapter_series)

    def _drop_adapter_series(self, adapter_id: str) -> None:
        for metric in (self.adapter_requests, self.prompt_tokens, self.generation_tokens):
            with contextlib.suppress(KeyError):
                metric.remove(adapter_id)
        for reason in ("length", "eos", "stop_sequence", "time_limit", "cancelled"):
            with contextlib.suppress(KeyError):
                self.requests.remove(reason, adapter_id)

    def serve(self, host: str, port: int) -> object:
        """Starts the /metrics HTTP endpoint in a daemon thread; returns the server."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
