"""Prometheus metrics scraped over HTTP from a real server, and the per-request log line."""

from __future__ import annotations

import json
import logging
import shutil
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraserve.logs import REQUEST_LOGGER, JsonFormatter
from loraserve.metrics import OTHER, AdapterLabels
from loraserve_client import AdapterNotFound, Client, InvalidRequest
from tests.helpers import PROMPTS, ServerThread, free_port


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def metered(store_copy):
    for i in range(4):  # 10 adapters in all, for the cardinality check
        shutil.copytree(store_copy.adapter("a1"), store_copy.store / f"b{i}")
    port = free_port()
    with ServerThread(
        model=str(store_copy.base),
        adapters_dir=store_copy.store,
        max_loaded_adapters=4,
        kv_cache_bytes=4 << 20,
        metrics_port=port,
        metrics_max_adapter_labels=3,
    ) as srv:
        srv.metrics_port = port
        with Client(srv.target) as client:
            srv.client = client
            yield srv


def test_counts_and_histograms_match_what_clients_received(metered) -> None:
    client = metered.client
    received: dict[str, list[int]] = {"a1": [], "org/a2": [], "": []}
    for i, prompt in enumerate(PROMPTS * 2):
        for adapter in received:
            if i % 2:
                result = client.generate(prompt, adapter, max_new_tokens=5 + i)
                received[adapter].append(result.usage.completion_tokens)
            else:
                chunks = list(client.generate_stream(prompt, adapter, max_new_tokens=5 + i))
                received[adapter].append(chunks[-1].usage.completion_tokens)
    for _ in range(3):
        with pytest.raises(InvalidRequest):
            client.generate("", "a1")
    for _ in range(2):
        with pytest.raises(AdapterNotFound):
            client.generate("hi", "missing")
    samples = scrape(metered.metrics_port)
    n = sum(len(v) for v in received.values())
    assert total(samples, "loraserve_requests_total") == n
    for adapter, label in (("a1", "a1"), ("org/a2", "org/a2"), ("", "__base__")):
        assert total(samples, "loraserve_requests_total", adapter=label) == len(received[adapter])
        assert total(samples, "loraserve_generation_tokens_total", adapter=label) == sum(received[adapter])
    tokens = sum(sum(v) for v in received.values())
    assert total(samples, "loraserve_time_to_first_token_seconds_count") == n
    assert total(samples, "loraserve_request_duration_seconds_count") == n
    assert total(samples, "loraserve_request_queue_time_seconds_count") == n
    assert total(samples, "loraserve_inter_token_latency_seconds_count") == tokens - n
    assert total(samples, "loraserve_request_errors_total", code="INVALID_ARGUMENT") == 3
    assert total(samples, "loraserve_request_errors_total", code="NOT_FOUND") == 2
    assert total(samples, "loraserve_adapter_slots_total") == 4
    assert 1 <= total(samples, "loraserve_adapter_slots_used") <= 4
    assert total(samples, "loraserve_adapter_loads_total", source_tier="disk") >= 2
    assert total(samples, "loraserve_kv_cache_usage_ratio") == 0
    assert total(samples, "loraserve_requests_running") == 0
    assert total(samples, "loraserve_batch_size_count") > 0
    assert "loraserve_adapters_loaded" in samples and "loraserve_batch_adapters_count" in samples


def test_adapter_labels_are_bounded(metered) -> None:
    client = metered.client
    adapters = ["a1", "org/a2", "a3", "a4", "a5", "a6", "b0", "b1", "b2", "b3"]
    for i, adapter in enumerate(adapters):
        for _ in range(1 + (i < 2)):  # a1 and org/a2 get the most traffic
            client.generate("hello", adapter, max_new_tokens=2)
    samples = scrape(metered.metrics_port)
    labels = {s.labels["adapter"] for s in samples["loraserve_requests_total"]}
    assert OTHER in labels and {"a1", "org/a2"} <= labels
    assert len(labels - {OTHER}) <= 3, labels
    assert total(samples, "loraserve_requests_total") == 12


def test_label_promotion_and_demotion() -> None:
    dropped = []
    labels = AdapterLabels(2, on_demote=dropped.append)
    assert [labels.observe(a) for a in ("x", "y", "z")] == ["x", "y", OTHER]
    labels.observe("z")  # z now has 2 requests: more than x's and y's single one
    assert labels.label("z") == "z" and len(labels.labelled) == 2 and dropped == ["x"]
    assert labels.observe("") == "__base__"


def test_request_log_line(server, caplog) -> None:
    with Client(server.target) as client, caplog.at_level(logging.INFO, logger=REQUEST_LOGGER):
        result = client.generate("secret prompt text", "a1", max_new_tokens=3)
    record = next(r for r in caplog.records if r.name == REQUEST_LOGGER and r.request_id == result.request_id)
    for field in (
        "tenant",
        "adapter",
        "prompt_tokens",
        "output_tokens",
        "queue_ms",
        "ttft_ms",
        "total_ms",
        "finish_reason",
    ):
        assert hasattr(record, field), field
    assert record.adapter == "a1" and record.output_tokens == 3
    line = JsonFormatter().format(record)
    parsed = json.loads(line)
    assert parsed["request_id"] == result.request_id and parsed["finish_reason"] == "length"
    assert "secret prompt text" not in line
