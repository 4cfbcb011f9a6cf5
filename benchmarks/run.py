"""`loraserve bench` (`python -m loraserve.benchmarks.run`): scenarios, peers in one run, a JSON report.

Scenarios (on the bench model of loraserve.benchmarks.models unless --model-size tiny):
- decode-distinct: C concurrent requests, each on its own rank-16 adapter (C slots), against the
  same engine with no adapters (goal: decode throughput >= 0.85x);
- poisson: Poisson arrivals, power-law popularity over N adapters, variable lengths, against
  PEFT generate(adapter_names=...) static batching (goal: >= 5x throughput), TTFT/ITL reported;
- overhead: the engine on the base model against a bare batched forward loop (goal: >= 0.9x);
- adapter-load: LoadAdapter over gRPC, disk -> device slot, p50, against PEFT load_adapter (goal: >= 10x);
- sweep: throughput as the adapter count grows to thousands (power-law popularity, default slots),
  as a ratio to the 8-adapter point (goal: >= 0.9x at 1,024), PEFT beside it where it keeps up;
- chat: multi-turn conversations over N tenants' adapters and system prompts, with the prefix
  cache on vs off (goal: TTFT p50 >= 3x lower with it, throughput not lower; benchmarks/chat.py);
- custom: the workload given by the flags, on the systems given by --systems.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import threading
import time
from typing import Any

import torch

from loraserve.benchmarks import systems as sysmod
from loraserve.benchmarks.chat import scenario_chat
from loraserve.benchmarks.models import BenchAssets, prepare
from loraserve.benchmarks.report import plot, ratios, summarize, write_report
from loraserve.benchmarks.training import scenario_training
from loraserve.benchmarks.workload import BenchRequest, WorkloadSpec, make_workload, with_adapter
from loraserve.demo.options import default_cache_dir


class Bench:
    """Shared state of one benchmark run: assets, engines, the progress bar."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.targets = [m.strip() for m in args.target_modules.split(",") if m.strip()]
        self.work_dir = args.work_dir or default_cache_dir() / "bench"
        self.device = (
            "cuda"
            if args.device == "auto" and torch.cuda.is_available()
            else ("cpu" if args.device == "auto" else args.device)
        )
        self._tokenizer: Any = None

    # ------------------------------------------------------------------ helpers
    def assets(self, adapters: int) -> BenchAssets:
        return on_fresh_thread(
            prepare, self.work_dir, self.args.model_size, adapters, self.args.rank, self.targets
        )

    def decode(self, ids: list[int]) -> str:
        if self._tokenizer is None:
            from loraserve.model_loader import load_tokenizer

            self._tokenizer = load_tokenizer(str(self.assets(1).model_dir))
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def workload(self, adapters: list[str], **overrides: Any) -> list[BenchRequest]:
        a = self.args
        fields = {
            "requests": a.requests,
            "adapters": adapters,
            "popularity": a.popularity,
            "alpha": a.alpha,
            "prompt_len": a.prompt_len,
            "output_len": a.output_len,
            "workload": a.workload,
            "rate": a.rate,
            "concurrency": a.concurrency,
            "seed": a.seed,
        }
        fields.update(overrides)
        vocab = 360 if a.model_size == "tiny" else 30000
        spec = WorkloadSpec(vocab=(10, vocab), **fields)
        needs_text = "grpc" in self.systems() or a.target
        return make_workload(spec, self.decode if needs_text else None)

    def systems(self) -> list[str]:
        return [s.strip() for s in self.args.systems.split(",") if s.strip()]

    def engine(
        self,
        assets: BenchAssets,
        slots: int | str,
        requests: list[BenchRequest],
        concurrency: int,
        max_rank: int | None = None,
    ) -> Any:
        """An engine on its own thread (model loaded there too), warmed up. slots: a count or "auto"."""
        from loraserve.engine.engine import Engine, EngineConfig
        from loraserve.engine.kv_sizing import KVGeometry
        from loraserve.model_loader import load_base_model

        def build() -> tuple[Any, EngineConfig]:
            loaded = load_base_model(str(assets.model_dir), self.args.quantization, self.device, "auto")
            # The cache fits the workload (every request at its longest, plus a little), not free memory.
            longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
            block_size = EngineConfig.block_size
            blocks = concurrency * (math.ceil(longest / block_size) + 1) + 8
            per_block = KVGeometry.of(loaded.model.config).bytes_per_block(block_size, loaded.dtype)
            config = EngineConfig(
                adapters_dir=assets.store,
                max_loaded_adapters=slots if slots == "auto" else max(1, int(slots)),
                max_lora_rank=max_rank or self.args.rank,
                max_num_seqs=max(concurrency, 64),
                max_num_batched_tokens=self.args.max_num_batched_tokens,
                block_size=block_size,
                kv_cache_bytes=blocks * per_block,
                max_queue_size=10_000,
                max_queue_per_tenant=10_000,
                max_host_adapter_bytes=4 * 1024**3,
            )
            return loaded, config

        return Engine.spawn(build, warmup=True).result()

    def progress(self, label: str, total: int) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=total, desc=label, unit="req", disable=self.args.quiet, leave=False, file=sys.stderr
        )

    def run_engine(
        self,
        engine: Any,
        requests: list[BenchRequest],
        workload: str,
        concurrency: int,
        label: str = "engine",
        quiet: bool = False,
    ) -> list[sysmod.Record]:
        with self.progress(label, len(requests)) as bar:
            return sysmod.run_engine(
                engine, requests, workload, concurrency, bar.update if not quiet else (lambda n: None)
            )

    def warm_adapters(self, engine: Any, adapters: list[str]) -> None:
        """Puts adapters on the device before timing (steady state for scenarios that fit)."""
        short = [BenchRequest(i, a, [11, 12, 13], 1, 0.0) for i, a in enumerate(adapters)]
        self.run_engine(engine, short, "closed", len(short), quiet=True)

    def peft(self, assets: BenchAssets, adapters: list[str]) -> sysmod.PeftPeer:
        return sysmod.PeftPeer(
            str(assets.model_dir), assets.store, adapters, self.args.quantization, self.device
        )

    def run_peft(
        self,
        assets: BenchAssets,
        adapters: list[str],
        requests: list[BenchRequest],
        workload: str,
        modes: list[str],
        batch: int,
    ) -> tuple[dict[str, list[sysmod.Record]], float]:
        """Loads PEFT and runs it, on a thread of its own like every system's tensor work."""

        def work() -> tuple[dict[str, list[sysmod.Record]], float]:
            peer = self.peft(assets, adapters)
            out = {}
            for mode in modes:
                with self.progress(f"peft-{mode}", len(requests)) as bar:
                    if mode == "batch":
                        out[mode] = peer.run_batched(requests, workload, batch, bar.update)
                    else:
                        out[mode] = peer.run_serial(requests, workload, bar.update)
            return out, peer.load_seconds

        return on_fresh_thread(work)

    # ------------------------------------------------------------------ scenarios
    def scenario(
        self,
        adapters: list[str],
        requests: list[BenchRequest],
        names: list[str],
        slots: int | str,
        workload: str,
        concurrency: int,
        assets: BenchAssets,
        warm: bool,
        max_rank: int | None = None,
    ) -> dict[str, Any]:
        results: dict[str, dict[str, Any]] = {}
        extras: dict[str, Any] = {}
        engine = None
        if {"engine", "engine-base", "grpc"} & set(names):
            engine = self.engine(assets, slots, requests, concurrency, max_rank)
            slots = engine.slots.num_slots
            if warm and adapters:
                self.warm_adapters(engine, sorted(set(r.adapter for r in requests if r.adapter)))
            if "engine" in names:
                results["engine"] = summarize(self.run_engine(engine, requests, workload, concurrency))
                extras["engine_preemptions"] = engine.scheduler.preemptions
                # Fairness under slot pressure: the most times one request was passed over.
                extras["engine_max_passed_over"] = engine.scheduler.max_passed_over
            if "engine-base" in names:
                results["engine-base"] = summarize(
                    self.run_engine(engine, with_adapter(requests, ""), workload, concurrency, "engine-base")
                )
            if "grpc" in names:
                results["grpc"] = summarize(self.grpc_round(engine, requests, workload, concurrency))
            engine.shutdown()
        modes = [m for m in ("batch", "serial") if f"peft-{m}" in names]
        if modes:
            used = sorted({r.adapter for r in requests if r.adapter}) or [assets.adapter_ids[0]]
            runs, extras["peft_adapter_load_seconds"] = self.run_peft(
                assets, used, requests, workload, modes, concurrency
            )
            for mode, records in runs.items():
                results[f"peft-{mode}"] = summarize(records)
        if "bare-loop" in names:
            base_requests = with_adapter(requests, "")
            with self.progress("bare-loop", len(requests)) as bar:
                records = on_fresh_thread(
                    sysmod.run_bare_loop,
                    str(assets.model_dir),
                    base_requests,
                    self.args.quantization,
                    self.device,
                    concurrency,
                    bar.update,
                )
            results["bare-loop"] = summarize(records)
        return {
            "workload": {
                "requests": len(requests),
                "adapters": len(adapters),
                "distinct_adapters_used": len({r.adapter for r in requests if r.adapter}),
                "slots": slots,
                "workload": workload,
                "concurrency": concurrency,
                "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
                "wanted_tokens": sum(r.max_new_tokens for r in requests),
            },
            "systems": results,
            "ratios": {**ratios(results, "engine"), **ratios(results, "engine-base")},
            **extras,
        }

    def grpc_round(
        self, engine: Any, requests: list[BenchRequest], workload: str, concurrency: int
    ) -> list[sysmod.Record]:
        """Through gRPC: --target if given, else an in-process server around the same engine."""
        if self.args.target:
            target = self.args.target
            with self.progress("grpc", len(requests)) as bar:
                return sysmod.run_grpc(target, requests, workload, concurrency, bar.update)
        from loraserve.benchmarks.inprocess import serve_engine

        with serve_engine(engine) as target, self.progress("grpc", len(requests)) as bar:
            return sysmod.run_grpc(target, requests, workload, concurrency, bar.update)


def on_fresh_thread(fn: Any, *args: Any) -> Any:
    """Runs fn on a new thread and returns its result: the main thread never does tensor work,
    so each system's OpenMP team is the only one active while it is measured."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def main() -> None:
        try:
            result.append(fn(*args))
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            failure.append(error)

    thread = threading.Thread(target=main, name="bench-work")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def with_goal(
    result: dict[str, Any], preset: dict[str, Any], ratio: str, figure: str, description: str, target: float
) -> dict[str, Any]:
    """Adds the preset and the goal (result["ratios"][ratio][figure] against target) to a scenario."""
    result["preset"] = preset
    result["goal"] = goal(description, result["ratios"].get(ratio, {}).get(figure), target)
    return result


def goal(description: str, measured: float | None, target: float) -> dict[str, Any]:
    return {
        "description": description,
        "target": target,
        "measured": measured,
        "met": measured is not None and measured >= target,
    }


# The named scenarios are fixed presets (the issues' goals); flags only shape `custom`.
PRESETS = {
    "decode-distinct": {"concurrency": 32, "prompt_len": (32, 32), "output_len": (64, 64)},
    "poisson": {
        "adapters": 100,
        "slots": 32,
        "requests": 128,
        "rate": 32.0,
        "batch": 32,
        "alpha": 1.0,
        "prompt_len": (16, 64),
        "output_len": (16, 64),
    },
    "overhead": {"concurrency": 32, "requests": 64, "prompt_len": (32, 32), "output_len": (64, 64)},
    # S-LoRA's setting: power-law popularity, small adapters (rank 8 on q/v), default slot sizing.
    "sweep": {
        "requests": 64,
        "concurrency": 32,
        "prompt_len": (16, 64),
        "output_len": (16, 64),
        "alpha": 1.0,
        "rank": 8,
        "targets": ["q_proj", "v_proj"],
        "peft_up_to": 32,
    },
}


def scenario_decode_distinct(bench: Bench) -> dict[str, Any]:
    p = PRESETS["decode-distinct"]
    c = p["concurrency"]
    assets = bench.assets(c)
    requests = bench.workload(
        assets.adapter_ids,
        requests=c,
        popularity="distinct",
        workload="closed",
        concurrency=c,
        prompt_len=p["prompt_len"],
        output_len=p["output_len"],
    )
    result = bench.scenario(
        assets.adapter_ids,
        requests,
        ["engine", "engine-base"],
        c,
        "closed",
        c,
        assets,
        warm=True,
    )
    return with_goal(
        result,
        p,
        "engine/engine-base",
        "steady_decode_tokens_per_s",
        f"{c} concurrent requests on {c} distinct rank-{bench.args.rank} adapters: decode "
        "throughput vs the same engine with no adapters",
        0.85,
    )


def scenario_poisson(bench: Bench) -> dict[str, Any]:
    p = PRESETS["poisson"]
    assets = bench.assets(p["adapters"])
    requests = bench.workload(
        assets.adapter_ids,
        workload="poisson",
        popularity="powerlaw",
        alpha=p["alpha"],
        requests=p["requests"],
        rate=p["rate"],
        prompt_len=p["prompt_len"],
        output_len=p["output_len"],
    )
    result = bench.scenario(
        assets.adapter_ids,
        requests,
        ["engine", "peft-batch"],
        p["slots"],
        "poisson",
        p["batch"],
        assets,
        warm=False,
    )
    return with_goal(
        result,
        p,
        "engine/peft-batch",
        "throughput_tokens_per_s",
        f"Poisson arrivals ({p['rate']:g}/s), power-law popularity over {p['adapters']} adapters: "
        "throughput vs PEFT generate(adapter_names=...) static batches",
        5.0,
    )


def scenario_overhead(bench: Bench) -> dict[str, Any]:
    p = PRESETS["overhead"]
    assets = bench.assets(1)
    requests = bench.workload(
        [], requests=p["requests"], workload="closed", prompt_len=p["prompt_len"], output_len=p["output_len"]
    )
    result = bench.scenario(
        [],
        with_adapter(requests, ""),
        ["engine-base", "bare-loop"],
        1,
        "closed",
        p["concurrency"],
        assets,
        warm=False,
    )
    return with_goal(
        result,
        p,
        "engine-base/bare-loop",
        "throughput_tokens_per_s",
        "base-only engine vs a bare batched forward loop of the same model (same batches)",
        0.9,
    )


def scenario_adapter_load(bench: Bench, repeats: int = 9) -> dict[str, Any]:
    """disk -> device slot through the adapter manager, against PEFT's load_adapter of the same files."""

    def grpc_loads(assets: BenchAssets) -> list[float]:
        """AdapterAdmin.LoadAdapter round trips against an idle serving engine, each from disk."""
        from loraserve.benchmarks.inprocess import serve_engine
        from loraserve_client import Client

        engine = bench.engine(assets, 2, [BenchRequest(0, "", [11, 12, 13], 1, 0.0)], 1)
        times = []
        try:
            with serve_engine(engine) as target, Client(target, timeout=60) as client:
                first = assets.adapter_ids[0]
                client.load_adapter(first)  # the call path's first-use costs, not counted
                client.unload_adapter(first)
                for adapter in assets.adapter_ids:
                    started = time.perf_counter()
                    client.load_adapter(adapter)
                    times.append(time.perf_counter() - started)
                    client.unload_adapter(adapter)  # back to disk only, as above
        finally:
            engine.shutdown()
        return times

    def measure(over_grpc: list[float]) -> dict[str, Any]:
        from loraserve.adapters.layer import SlotTable
        from loraserve.adapters.manager import AdapterManager
        from loraserve.adapters.store import AdapterStore
        from loraserve.model_loader import load_base_model

        assets = bench.assets(repeats)
        loaded = load_base_model(str(assets.model_dir), bench.args.quantization, bench.device, "auto")
        slots = SlotTable.attach(loaded.model, 2, bench.args.rank, loaded.dtype, loaded.device)
        woken = threading.Event()
        manager = AdapterManager(AdapterStore(assets.store), slots, 4 * 1024**3, wake=woken.set)
        ours = []
        for adapter in assets.adapter_ids:
            started = time.perf_counter()
            future = manager.load(adapter)
            while not future.done():
                # What an idle engine loop does: sleep until the reader wakes it, then place.
                woken.wait(1.0)
                woken.clear()
                manager.housekeeping()
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            ours.append(time.perf_counter() - started)
            manager.unload(adapter)  # back to disk only: the next load reads its files again
        manager.shutdown()
        peer = bench.peft(assets, assets.adapter_ids[:1])
        theirs = []
        for i, adapter in enumerate(assets.adapter_ids):
            started = time.perf_counter()
            peer.model.load_adapter(str(assets.store / adapter), adapter_name=f"load{i}")
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            theirs.append(time.perf_counter() - started)
            peer.model.delete_adapter(f"load{i}")
        ours_p50, theirs_p50 = statistics.median(ours), statistics.median(theirs)
        grpc_p50 = statistics.median(over_grpc)
        return {
            "adapter": {
                "rank": bench.args.rank,
                "targets": bench.targets,
                "bytes": sum(p.stat().st_size for p in (assets.store / assets.adapter_ids[0]).iterdir()),
            },
            "loraserve_seconds": {"p50": ours_p50, "all": ours},
            "grpc_load_adapter_seconds": {"p50": grpc_p50, "all": over_grpc},
            "peft_load_adapter_seconds": {"p50": theirs_p50, "all": theirs},
            "in_process_ratio": theirs_p50 / ours_p50,
            "goal": goal(
                "LoadAdapter over gRPC, disk -> device slot of a serving engine, vs PEFT load_adapter "
                "(p50 ratio)",
                theirs_p50 / grpc_p50,
                10.0,
            ),
        }

    # gRPC first, from a thread that runs no tensor op: the engine's OpenMP team is then the only
    # one in the process (a team left spinning by the in-process run slowed the engine's copy).
    over_grpc = on_fresh_thread(grpc_loads, bench.assets(repeats))
    return on_fresh_thread(measure, over_grpc)


def scenario_sweep(bench: Bench) -> dict[str, Any]:
    """Power-law popularity over 1..N adapters (--sweep) on the server's default slot sizing (auto;
    --slots N fixes a count), each point's throughput as a ratio to the 8-adapter point's; PEFT
    batched beside the engine up to PRESETS["sweep"]["peft_up_to"] adapters, when --systems has it."""
    from loraserve.engine.engine import EngineConfig

    p = PRESETS["sweep"]
    counts = [int(c) for c in bench.args.sweep.split(",") if c.strip()]
    slots: int | str = bench.args.slots or "auto"
    with_peft = "peft-batch" in bench.systems()
    targets, bench.targets = bench.targets, list(p["targets"])
    rank, bench.args.rank = bench.args.rank, p["rank"]
    points = []
    try:
        for count in counts:
            assets = bench.assets(count)
            requests = bench.workload(
                assets.adapter_ids,
                popularity="powerlaw",
                alpha=p["alpha"],
                workload="closed",
                requests=p["requests"],
                concurrency=p["concurrency"],
                prompt_len=p["prompt_len"],
                output_len=p["output_len"],
            )
            names = ["engine"] + (["peft-batch"] if with_peft and count <= p["peft_up_to"] else [])
            result = bench.scenario(
                assets.adapter_ids,
                requests,
                names,
                slots,
                "closed",
                p["concurrency"],
                assets,
                warm=False,
                max_rank=EngineConfig.max_lora_rank,  # the server's default, as a deployment has it
            )
            point = {
                "adapters": count,
                "distinct_adapters_used": result["workload"]["distinct_adapters_used"],
                "slots": result["workload"]["slots"],
                "max_passed_over": result.get("engine_max_passed_over"),
                **result["systems"],
            }
            points.append(point)
    finally:
        bench.targets, bench.args.rank = targets, rank
    base = next((pt for pt in points if pt["adapters"] == 8), None)
    for point in points:
        if base is not None:
            point["ratio_to_8"] = (
                point["engine"]["throughput_tokens_per_s"] / base["engine"]["throughput_tokens_per_s"]
            )
    at_1024 = next((pt for pt in points if pt["adapters"] == 1024), None)
    measured = at_1024.get("ratio_to_8") if at_1024 is not None else None
    return {
        "slots": slots,
        "preset": p,
        "sweep": points,
        "goal": goal("engine throughput over 1,024 adapters vs over 8 (power law, alpha 1)", measured, 0.9),
    }


def scenario_custom(bench: Bench) -> dict[str, Any]:
    assets = bench.assets(bench.args.adapters)
    requests = bench.workload(assets.adapter_ids)
    slots = bench.args.slots or min(max(bench.args.adapters, 1), 32)
    return bench.scenario(
        assets.adapter_ids,
        requests,
        bench.systems(),
        slots,
        bench.args.workload,
        bench.args.concurrency,
        assets,
        warm=False,
    )


SCENARIOS = {
    "decode-distinct": scenario_decode_distinct,
    "poisson": scenario_poisson,
    "overhead": scenario_overhead,
    "adapter-load": scenario_adapter_load,
    "sweep": scenario_sweep,
    "chat": scenario_chat,
    "training": scenario_training,
    "custom": scenario_custom,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    names = (
        ["decode-distinct", "poisson", "overhead", "adapter-load", "sweep", "chat", "training"]
        if args.scenario == "all"
        else [args.scenario]
    )
    scenarios = {}
    for name in names:
        if not args.quiet:
            print(f"== {name}", file=sys.stderr)
        scenarios[name] = SCENARIOS[name](bench)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"}
    config["device"] = bench.device
    report = write_report(args.out, config, scenarios)
    if args.plot:
        report["plots"] = [str(p) for p in plot(report, args.out.parent)]
    return report


def print_summary(report: dict[str, Any]) -> None:
    for name, scenario in report["scenarios"].items():
        print(f"{name}:")
        for system, summary in scenario.get("systems", {}).items():
            ttft, itl = summary["ttft_seconds"], summary["inter_token_latency_seconds"]
            print(
                f"  {system:12s} {summary['throughput_tokens_per_s']:9.1f} tok/s  "
                f"TTFT p50 {(ttft['p50'] or 0) * 1e3:8.1f} ms  p99 {(ttft['p99'] or 0) * 1e3:8.1f} ms  "
                f"ITL p50 {(itl['p50'] or 0) * 1e3:7.1f} ms  p99 {(itl['p99'] or 0) * 1e3:7.1f} ms  "
                f"errors {summary['errors']}"
            )
        for point in scenario.get("sweep", []):
            peft = point.get("peft-batch", {}).get("throughput_tokens_per_s")
            print(
                f"  {point['adapters']:5d} adapters ({point.get('distinct_adapters_used', '?')} used, "
                f"{point.get('slots', '?')} slots): {point['engine']['throughput_tokens_per_s']:9.1f} tok/s"
                + (f"  {point['ratio_to_8']:.2f}x of 8" if "ratio_to_8" in point else "")
                + (f"  peft-batch {peft:.1f} tok/s" if peft else "")
                + f"  passed over <= {point.get('max_passed_over')}"
            )
        if "goal" in scenario:
            g = scenario["goal"]
            measured = "n/a" if g["measured"] is None else f"{g['measured']:.2f}x"
            verdict = ""
            if g["target"] is not None:
                verdict = f" (target {g['target']}x) {'MET' if g['met'] else 'NOT MET'}"
            print(f"  goal: {g['description']}: {measured}{verdict}")


def bench_cli(args: argparse.Namespace) -> int:
    report = run(args)
    print_summary(report)
    print(f"report: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from loraserve.benchmarks.options import add_bench_flags
    from loraserve.logs import setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m loraserve.benchmarks.run", description=__doc__.splitlines()[0]
    )
    add_bench_flags(parser)
    setup_logging("warning")
    return bench_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
