"""Prefix caching as clients see it: usage over gRPC and the CLI's --json, and the metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import time

PROMPT = "loraserve serves the quick brown fox " * 8  # unique to this test: no other test's blocks


def test_a_repeated_prompt_reports_cached_tokens_in_usage_json_and_metrics(server, client) -> None:
    registry = server.metrics.registry
    hits_before = registry.get_sample_value("loraserve_prefix_cache_hits_total") or 0.0
    first = client.generate(PROMPT, "a5", max_new_tokens=4)
    second = client.generate(PROMPT, "a5", max_new_tokens=4)
    assert first.usage.cached_prompt_tokens == 0
    block = server.engine.blocks.block_size
    cached = (second.usage.prompt_tokens - 1) // block * block
    assert cached > 0 and second.usage.cached_prompt_tokens == cached
    assert second.token_ids == first.token_ids

    code = "import sys\nfrom loraserve.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = ["generate", "--target", server.target, "-a", "a5", "-n", "4", "--json", PROMPT]
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["usage"]["cached_prompt_tokens"] == cached

    hits = registry.get_sample_value("loraserve_prefix_cache_hits_total") - hits_before
    assert hits >= 2 * cached
    assert registry.get_sample_value("loraserve_prefix_cache_queries_total") >= hits
    # A gauge, set after the step that ended the CLI's request (its blocks then cached, no longer
    # held), which may still be finishing on the engine thread when the CLI has its answer.
    deadline = time.monotonic() + 60
    while registry.get_sample_value("loraserve_prefix_cache_blocks") < cached // block:
        assert time.monotonic() < deadline, registry.get_sample_value("loraserve_prefix_cache_blocks")
        time.sleep(0.01)
