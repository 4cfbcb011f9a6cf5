"""Many tenants at once: concurrent requests on different adapters, batched together by the server.

python clients/examples/mixed_adapters_async.py --target 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import asyncio
import time

from loraserve_client import AsyncClient

JOBS = [
    ("pt-en", "o gato preto"),
    ("en-pt", "the old houses"),
    ("support-bot", "How do I unload an adapter?"),
    ("pt-en", "uma flor amarela"),
    ("en-pt", "a happy girl"),
    ("support-bot", "Which port are metrics on?"),
    ("", "o rato"),
]


async def main(target: str) -> None:
    async with AsyncClient(target) as client:
        started = time.perf_counter()
        answers = await asyncio.gather(
            *(client.chat([("user", text)], adapter, max_new_tokens=48) for adapter, text in JOBS)
        )
        elapsed = time.perf_counter() - started
    for (adapter, text), answer in zip(JOBS, answers):
        print(f"[{adapter or 'base'}] {text!r} -> {answer.text.strip()!r}")
    print(f"{len(JOBS)} requests on {len({a for a, _ in JOBS})} adapters in {elapsed:.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    asyncio.run(main(parser.parse_args().target))
