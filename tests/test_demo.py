"""The from-scratch toy demo (`loraserve demo --toy`, kept for the tests): adapters that clearly beat
the base model, served with its model and adapter store. The README's session runs against the
real default demo instead (tests/test_readme_demo.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve.demo.build import ensure_demo
from loraserve_client import Client
from tests.helpers import ServerThread

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo():
    """`loraserve demo` in its own process (the build is tensor work: alone, it is not slowed by
    this test process's other threads), cached under the user cache dir: built once per machine."""
    run = subprocess.run(
        [sys.executable, "-m", "loraserve.cli", "demo", "--toy", "--json"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    built = json.loads(run.stdout)
    assert built["model_dir"] == str(ensure_demo(progress=False).model_dir)  # the cached build, found again
    return ensure_demo(progress=False)


@pytest.fixture(scope="module")
def demo_server(demo):
    # The from-scratch toy demo (`loraserve demo --toy`): `make serve` serves the real model.
    with ServerThread(
        model=str(demo.model_dir), adapters_dir=str(demo.adapters_dir), kv_cache_bytes=8 << 20
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def demo_client(demo_server):
    with Client(demo_server.target) as client:
        yield client


def _held_out(demo, adapter_id: str, n: int) -> list[tuple[str, str]]:
    rows = (demo.data_dir / f"{adapter_id}.eval.jsonl").read_text().splitlines()[:n]
    return [(m["messages"][0]["content"], m["messages"][1]["content"]) for m in map(json.loads, rows)]


def test_adapters_clearly_beat_the_base_model(demo) -> None:
    report = demo.report
    assert set(report["adapters"]) == {"pt-en", "en-pt", "support-bot"}
    for adapter_id, scores in report["adapters"].items():
        assert scores["exact_match"] >= 0.8, (adapter_id, scores)
        assert scores["base_exact_match"] <= 0.1, (adapter_id, scores)
    # Its build time is a speed figure (reported by `loraserve demo`), not asserted: machines are shared.
    assert report["seconds"] > 0


def test_served_demo_translates_held_out_phrases(demo, demo_client: Client) -> None:
    info = demo_client.model_info()
    assert info.model == str(demo.model_dir) and info.quantization == "nf4"
    for adapter_id in ("pt-en", "en-pt"):
        pairs = _held_out(demo, adapter_id, 4)
        right = sum(
            demo_client.chat([("user", src)], adapter_id, max_new_tokens=16).text.strip() == dst
            for src, dst in pairs
        )
        assert right >= 3, adapter_id


def test_support_bot_answers_and_adapters_differ(demo, demo_client: Client) -> None:
    question, answer = _held_out(demo, "support-bot", 1)[0]
    assert demo_client.chat([("user", question)], "support-bot", max_new_tokens=40).text.strip() == answer
    same_prompt = [("user", "o gato preto")]
    outputs = {
        a: demo_client.chat(same_prompt, a, max_new_tokens=16).text for a in ("", "pt-en", "support-bot")
    }
    assert outputs["pt-en"].strip() == "the black cat"
    assert len(set(outputs.values())) == 3


def test_client_examples_against_the_demo(demo_client: Client) -> None:
    examples = ROOT / "clients" / "examples"
    target = demo_client.options.target

    def run(name: str, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [sys.executable, str(examples / name), "--target", target, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run("translate_service.py", "o gato preto").strip() == "o gato preto -> the black cat"
    answer = run("support_chatbot.py", stdin="How do I load an adapter?\n").strip()
    assert answer == "Run loraserve adapters load ID, or call AdapterAdmin.LoadAdapter."
    output = run("mixed_adapters_async.py")
    assert "7 requests on 4 adapters" in output and "'the black cat'" in output
