"""The GPU check: one prepared run (at most 8 minutes) on one CUDA GPU, writing one JSON report.

Run it as `scripts/gpu_check.sh` (see benchmarks/README.md, "GPU check"). The GPU machine has
Python 3.12, torch with CUDA, triton, transformers, peft, grpcio and prometheus-client, and no
network; what loraserve needs beyond that travels as wheels in gpu-wheels/ (git-ignored, fetched
here by `--dry-run`). Steps, each time-boxed, the report rewritten after each:

 1. wheels   gpu-wheels/ holds every wheel of WHEELS (cp312 / manylinux x86_64 / py3); with
             --dry-run, missing ones are downloaded and bitsandbytes is cut to its CUDA 12.8/13
             and CPU libraries. The tree that travels (repository files + wheels) must stay
             under 64 MiB.
 2. install  the wheels go into a private folder (pip --target, --no-deps, --no-index) that is put
             first on PYTHONPATH, with loraserve itself as a tree of links (no pip install of it).
 3. kernels  LoRA time per step of the `triton` and `torch` backends (32 distinct rank-16
             adapters, one decode token each, every linear module of the 1B model's 16 layers,
             bf16; eager and as a replayed CUDA graph), the paged-attention kernel against the
             SDPA gather; --dry-run: tiny shapes on CPU, torch backend only. First: a goal, quick.
 4. tests    the tests marked `gpu` (the Triton LoRA and paged-attention kernels against their
             references on CUDA, captured in CUDA graphs, a CUDA server against PEFT);
             --dry-run only collects them.
 5. model    the 1B-parameter bench model and 100 rank-16 adapters (random weights, seeded);
             --dry-run: counts the 1B config's parameters on the meta device.
 6. bench    `loraserve bench` decode-distinct and poisson on it (NF4 base, bf16, 32 slots);
             --dry-run: decode-distinct and a small custom Poisson run on the tiny model on CPU.

Goals (ratios within the run): 32 distinct adapters >= 0.8x the no-adapter engine's steady
decode throughput; the triton backend's LoRA time per step <= 1/3 of the torch backend's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / "gpu-wheels"
TRAVEL_LIMIT = 64 * 1024 * 1024
# What the GPU machine lacks (or may have too old for the checked-in gRPC stubs), pinned as in
# pyproject.toml where it pins them.
WHEELS = [
    "bitsandbytes==0.50.2",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "pydantic-settings==2.16.3",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "python-dotenv==1.2.4",
    "grpcio==1.85.1",
    "grpcio-health-checking==1.85.1",
    "grpcio-reflection==1.85.1",
    "protobuf==7.36.2",
    "regex==2026.11.19",
    "gguf==0.19.0",
    "pytest==9.2.0",
    "pytest-timeout==2.4.0",
    "pluggy==1.7.0",
    "iniconfig==2.3.1",
]
PLATFORM_FLAGS = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux_2_24_x86_64",
    "--platform",
    "manylinux_2_28_x86_64",
]
# bitsandbytes ships one library per CUDA / ROCm / XPU version (43 MB); torch 2.11 runs CUDA 13.
BNB_KEEP = ("libbitsandbytes_cuda128", "libbitsandbytes_cuda13", "libbitsandbytes_cpu")
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# Caps per step, in seconds (the whole run: 8 minutes on the GPU).
CAPS = {"install": 60, "tests": 120, "kernels": 60, "model": 90, "decode-distinct": 120, "poisson": 120}


def _dist_name(spec: str) -> str:
    return spec.split("==")[0].lower().replace("-", "_")


def _wheel_for(spec: str) -> Path | None:
    name, version = spec.split("==")
    prefix = f"{name.lower().replace('-', '_')}-{version}-"
    return next((p for p in sorted(WHEEL_DIR.glob("*.whl")) if p.name.lower().startswith(prefix)), None)


def strip_bitsandbytes(wheel: Path) -> None:
    """Rewrites the bitsandbytes wheel without the libraries of other CUDA/ROCm/XPU versions."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = set()
        for info in src.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and not base.startswith(BNB_KEEP):
                dropped.add(info.filename)
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # keep RECORD true to the contents
                lines = data.decode().splitlines()
                data = ("\n".join(ln for ln in lines if ln.split(",")[0] not in dropped) + "\n").encode()
            dst.writestr(info, data)
    tmp.replace(wheel)


def step_wheels(dry_run: bool) -> dict[str, Any]:
    WHEEL_DIR.mkdir(exist_ok=True)
    missing = [spec for spec in WHEELS if _wheel_for(spec) is None]
    if missing and dry_run:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *PLATFORM_FLAGS, "-d", str(WHEEL_DIR)]
        subprocess.run([*cmd, *missing], check=True, capture_output=True, text=True, timeout=600)
        missing = [spec for spec in WHEELS if _wheel_for(spec) is None]
    if missing:
        raise RuntimeError(
            f"gpu-wheels/ lacks {missing}: run scripts/gpu_check.sh --dry-run where a network is"
        )
    bnb = _wheel_for("bitsandbytes==0.50.2")
    with zipfile.ZipFile(bnb) as z:
        names = [i.filename.rsplit("/", 1)[-1] for i in z.infolist()]
    if any(n.startswith("libbitsandbytes_") and not n.startswith(BNB_KEEP) for n in names):
        strip_bitsandbytes(bnb)
    wheels = {_wheel_for(spec).name: _wheel_for(spec).stat().st_size for spec in WHEELS}
    extra = sorted(p.name for p in WHEEL_DIR.glob("*.whl") if p.name not in wheels)
    for name in wheels:  # cp312 or pure-Python, Linux x86_64 or any platform
        tags = name[:-4].split("-")[-3:]
        assert tags[0] in ("cp312", "py3", "cp310", "cp39", "py2.py3"), name
        assert tags[2] == "any" or "x86_64" in tags[2], name
    return {"wheels": wheels, "unused": extra, "bytes": sum(wheels.values())}


def step_sizes() -> dict[str, Any]:
    """Bytes of what travels to the GPU machine: tracked and untracked non-ignored files + wheels.

    Where the copy has no git metadata (the GPU machine's may not), every file is counted but
    caches, virtual environments and reports."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
    )
    if listed.returncode == 0:
        paths = [ROOT / p.decode() for p in listed.stdout.split(b"\0") if p]
    else:
        skip = {".git", ".venv", "__pycache__", "bench-results", "gpu-wheels", ".pytest_cache", ".ruff_cache"}
        paths = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    tree = sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())
    wheels = sum(p.stat().st_size for p in WHEEL_DIR.glob("*.whl"))
    total = tree + wheels
    if total >= TRAVEL_LIMIT:
        raise RuntimeError(f"{total / 2**20:.1f} MiB would travel; the limit is 64 MiB")
    return {"tree_bytes": tree, "wheel_bytes": wheels, "total_mib": round(total / 2**20, 2), "limit_mib": 64}


def link_tree(work: Path) -> Path:
    """loraserve (server/ + adapters/ + benchmarks/) and loraserve_client (clients/) as links."""
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    package = src / "loraserve"
    package.mkdir(parents=True)
    for entry in (ROOT / "server").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "adapters").symlink_to(ROOT / "adapters")
    (package / "benchmarks").symlink_to(ROOT / "benchmarks")
    (src / "loraserve_client").symlink_to(ROOT / "clients")
    return src


def step_install(work: Path, dry_run: bool) -> dict[str, Any]:
    site = work / "site"
    shutil.rmtree(site, ignore_errors=True)
    wheels = [str(_wheel_for(spec)) for spec in WHEELS]
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), "-q"]
    if dry_run:  # this Python is not the GPU machine's: install for its platform
        cmd += PLATFORM_FLAGS
    run = subprocess.run([*cmd, *wheels], capture_output=True, text=True, timeout=CAPS["install"])
    how = "pip --target"
    if run.returncode != 0 and "No module named pip" in run.stderr:
        # A Python without pip: a wheel is a zip of its site-packages files (none of these use .data).
        site.mkdir(parents=True)
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
        how = "unzipped (no pip)"
    elif run.returncode != 0:
        raise RuntimeError(f"pip install --target failed:\n{run.stderr[-3000:]}")
    src = link_tree(work)
    env = environment(work)
    probe = "import loraserve, loraserve.engine.paged_attention, loraserve_client; print(loraserve.__file__)"
    if dry_run:  # the wheels are for 3.12: only the link tree is imported here
        env["PYTHONPATH"] = os.pathsep.join([str(src), str(ROOT)])
    found = subprocess.run(
        [sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True, timeout=120
    ).stdout.strip()
    assert found.startswith(str(src)), f"loraserve imported from {found}, not the link tree"
    packages = len(list(site.glob("*.dist-info")))
    return {"site": str(site), "how": how, "packages": packages, "loraserve": found}


def environment(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(work / "src"), str(work / "site"), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_logged(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    """Runs cmd with output to `log` (kept in the report folder); raises on failure or timeout."""
    with log.open("w") as handle:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
        )
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])}... exited {proc.returncode}:\n{tail}")
    return proc


def step_tests(work: Path, out: Path, dry_run: bool, timeout: float) -> dict[str, Any]:
    files = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text()
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs", *files]
    env = environment(work)
    if dry_run:
        cmd.append("--collect-only")
        env["PYTHONPATH"] = os.pathsep.join([str(work / "src"), str(ROOT)])
    log = out / "gpu-tests.log"
    run_logged(cmd, env, timeout, log)
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    return {"files": files, "summary": lines[-1] if lines else "", "log": log.name}


# --- step 4: kernel timings (run in a subprocess on the GPU, see `kernels_main`) -----------------

MODULE_SHAPES_1B = {  # (in, out) of each adapted linear of one layer of the 1B model
    "q_proj": (2048, 2048),
    "k_proj": (2048, 512),
    "v_proj": (2048, 512),
    "o_proj": (2048, 2048),
    "gate_proj": (2048, 8192),
    "up_proj": (2048, 8192),
    "down_proj": (8192, 2048),
}


def lora_step_times(
    device: str, layers: int, shapes: dict, slots: int, rank: int, backends: list[str]
) -> dict:
    """One step's LoRA work per backend, in ms (median), with one decode token on each of `slots`
    distinct adapters, and the max error of one module against `reference`:

    - eager_ms: plan + every module's apply, as the engine runs it today (kernel launches from
      Python included: at 32 tokens the work per module is microseconds, so launches weigh);
    - graph_ms (CUDA): the same applies captured once in a CUDA graph and replayed, the plan
      fixed: the device time, where the step is headed (no per-layer Python decision blocks it).
    """
    import torch

    from loraserve.adapters.lora_backends import lora_reference, select_lora_backend

    dev = torch.device(device)
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    modules = []
    for _ in range(layers):
        for i, o in shapes.values():
            a = (torch.randn(slots, rank, i, generator=g) / i**0.5).to(dtype).to(dev)
            b = (torch.randn(slots, rank, o, generator=g) / rank**0.5).to(dtype).to(dev).transpose(1, 2)
            x = torch.randn(slots, i, generator=g).to(dtype).to(dev)
            modules.append((a, b, x, torch.zeros(slots, o, dtype=dtype, device=dev)))
    slot_of_token = list(range(slots))
    ranks = [rank] * slots
    result: dict[str, Any] = {"tokens": slots, "modules": len(modules), "dtype": str(dtype)}

    def median_ms(fn: Any, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return round(statistics.median(times), 4)

    for name in backends:
        backend = select_lora_backend(name, dev)

        def step(backend: Any = backend) -> None:
            plan = backend.plan(slot_of_token, ranks)
            for a, b, x, y in modules:
                backend.apply(y, x, a, b, plan)

        for _ in range(3):
            step()
        entry: dict[str, Any] = {"eager_ms": median_ms(step, 10 if cuda else 3)}
        if cuda:
            plan = backend.plan(slot_of_token, ranks)

            def applies(backend: Any = backend, plan: Any = plan) -> None:
                for a, b, x, y in modules:
                    backend.apply(y, x, a, b, plan)

            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    applies()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    applies()
                graph.replay()
                entry["graph_ms"] = median_ms(graph.replay, 20)
            except Exception as error:  # noqa: BLE001 - a capture failure is a finding to report
                entry["graph_error"] = f"{type(error).__name__}: {error}"[:500]
        a, b, x, _ = modules[0]
        y = torch.zeros(slots, b.shape[1], dtype=dtype, device=dev)
        backend.apply(y, x, a, b, backend.plan(slot_of_token, ranks))
        ref = lora_reference(x.double().cpu(), slot_of_token, a.double().cpu(), b.double().cpu())
        entry["max_abs_error"] = float((y.double().cpu() - ref).abs().max())
        result[name] = entry
    if "torch" in result and "triton" in result:
        for key in ("eager_ms", "graph_ms"):
            if key in result["torch"] and key in result["triton"]:
                ratio = result["torch"][key] / result["triton"][key]
                result[f"torch_over_triton_{key[:-3]}"] = round(ratio, 2)
    return result


def attention_times(contexts: list[int]) -> dict:
    """Decode attention of 32 sequences (GQA 32/8, head_dim 64, bf16) per layer: kernel vs SDPA gather."""
    import torch

    from loraserve.engine import attention as attn
    from loraserve.engine.attention import AttentionMetadata
    from loraserve.forward_context import ForwardContext, forward_context

    dev = torch.device("cuda")
    heads, kv_heads, dim, block = 32, 8, 64, 16
    out: dict[str, Any] = {}
    for ctx in contexts:
        seqs = 32
        blocks_per = -(-ctx // block)
        perm = torch.randperm(seqs * blocks_per)
        tables = perm.view(seqs, blocks_per)
        rows = (tables[:, :, None] * block + torch.arange(block)).view(seqs, -1)[:, :ctx]
        k_cache = torch.randn(1, seqs * blocks_per * block, kv_heads, dim, dtype=torch.bfloat16, device=dev)
        v_cache = torch.randn_like(k_cache)
        meta = AttentionMetadata(k_cache, v_cache, rows[:, -1].to(dev))
        meta.decode_tokens = torch.arange(seqs, device=dev)
        meta.decode_rows = rows.to(dev)
        meta.decode_lengths = torch.full((seqs,), ctx, device=dev)
        meta.decode_mask = torch.ones(seqs, 1, 1, ctx, dtype=torch.bool, device=dev)
        q = torch.randn(1, heads, seqs, dim, dtype=torch.bfloat16, device=dev)
        k = torch.randn(1, kv_heads, seqs, dim, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        layer = type("Layer", (), {"layer_idx": 0})()
        results = {}
        real = attn.kernel_available
        for name, available in (("triton", real), ("sdpa_gather", lambda _device: False)):
            attn.kernel_available = available  # the SDPA path is the CPU one; timed here on CUDA
            try:
                with forward_context(ForwardContext(meta)):
                    for _ in range(3):
                        o, _ = attn.paged_attention_forward(layer, q, k, v, None, dim**-0.5)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(20):
                        o, _ = attn.paged_attention_forward(layer, q, k, v, None, dim**-0.5)
                    torch.cuda.synchronize()
                results[name] = ((time.perf_counter() - start) / 20 * 1e3, o.float())
            finally:
                attn.kernel_available = real
        err = float((results["triton"][1] - results["sdpa_gather"][1]).abs().max())
        out[f"ctx{ctx}"] = {
            "triton_ms": round(results["triton"][0], 4),
            "sdpa_gather_ms": round(results["sdpa_gather"][0], 4),
            "max_abs_difference": err,
        }
    return out


def kernels_main(dry_run: bool) -> None:
    """Entry of the kernel-timing subprocess: prints one JSON object."""
    if dry_run:
        tiny = {"q_proj": (64, 64), "down_proj": (128, 64)}
        print(json.dumps({"lora": lora_step_times("cpu", 2, tiny, 8, 16, ["torch"])}))
        return
    report = {"lora": lora_step_times("cuda", 16, MODULE_SHAPES_1B, 32, 16, ["torch", "triton"])}
    report["attention_decode_per_layer"] = attention_times([96, 1024])
    print(json.dumps(report))


def step_kernels(work: Path, out: Path, dry_run: bool, timeout: float) -> dict[str, Any]:
    env = environment(work)
    if dry_run:
        env["PYTHONPATH"] = os.pathsep.join([str(work / "src"), str(ROOT)])
    cmd = [sys.executable, str(Path(__file__)), "--kernels-only", *(["--dry-run"] if dry_run else [])]
    log = out / "kernels.log"
    run_logged(cmd, env, timeout, log)
    return json.loads(log.read_text().strip().splitlines()[-1])


def step_model(work: Path, out: Path, dry_run: bool, timeout: float) -> dict[str, Any]:
    env = environment(work)
    if dry_run:
        env["PYTHONPATH"] = os.pathsep.join([str(work / "src"), str(ROOT)])
        code = (
            "import json, torch\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "from loraserve.benchmarks.models import SHAPES\n"
            "with torch.device('meta'):\n"
            "    m = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **SHAPES['1b']))\n"
            "print(json.dumps({'parameters': sum(p.numel() for p in m.parameters())}))\n"
        )
    else:
        code = (
            "import json, sys\n"
            "from pathlib import Path\n"
            "from loraserve.benchmarks.models import prepare\n"
            f"a = prepare(Path({str(work / 'bench')!r}), '1b', 100, 16, {TARGETS.split(',')!r})\n"
            "print(json.dumps({'model': str(a.model_dir), 'adapters': len(a.adapter_ids)}))\n"
        )
    log = out / "model.log"
    run_logged([sys.executable, "-c", code], env, timeout, log)
    return json.loads(log.read_text().strip().splitlines()[-1])


def step_bench(work: Path, out: Path, scenario: str, dry_run: bool, timeout: float) -> dict[str, Any]:
    env = environment(work)
    size, device = ("tiny", "cpu") if dry_run else ("1b", "cuda")
    if dry_run:
        env["PYTHONPATH"] = os.pathsep.join([str(work / "src"), str(ROOT)])
    report_path = out / f"bench-{scenario}.json"
    preset = ["--scenario", scenario]
    key = scenario
    if dry_run and scenario == "poisson":
        # The preset's 100 adapters and PEFT baseline take minutes on a CPU: the same command path
        # on a small custom Poisson workload.
        preset = ["--scenario", "custom", "--workload", "poisson", "--requests", "8", "--adapters", "4"]
        preset += ["--rate", "8", "--output-len", "4:8", "--systems", "engine,peft-batch"]
        key = "custom"
    cmd = [
        sys.executable,
        "-m",
        "loraserve.benchmarks.run",
        *preset,
        "--model-size",
        size,
        "--device",
        device,
        "--work-dir",
        str(work / "bench"),
        "--out",
        str(report_path),
        "--quiet",
    ]
    run_logged(cmd, env, timeout, out / f"bench-{scenario}.log")
    report = json.loads(report_path.read_text())
    scen = report["scenarios"][key]
    summary = {
        system: {
            "tokens_per_s": s.get("throughput_tokens_per_s"),
            "steady_decode_tokens_per_s": s.get("steady_decode_tokens_per_s"),
            "ttft_p50_s": s.get("ttft_seconds", {}).get("p50"),
            "itl_p50_s": s.get("inter_token_latency_seconds", {}).get("p50"),
            "errors": s.get("errors"),
        }
        for system, s in scen.get("systems", {}).items()
    }
    return {"report": report_path.name, "systems": summary, "bench_goal": scen.get("goal")}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
    for name in ("triton", "transformers", "peft", "grpc", "prometheus_client"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    return info


def goals(steps: dict[str, Any]) -> dict[str, Any]:
    decode = steps.get("decode-distinct", {}).get("result", {})
    systems = decode.get("systems", {})
    base = (systems.get("engine-base") or {}).get("steady_decode_tokens_per_s")
    lora = (systems.get("engine") or {}).get("steady_decode_tokens_per_s")
    ratio = round(lora / base, 3) if lora and base else None
    lora = steps.get("kernels", {}).get("result", {}).get("lora", {})
    # Device time (CUDA graph replay) where the capture worked, else the eager step.
    speedup = lora.get("torch_over_triton_graph", lora.get("torch_over_triton_eager"))
    return {
        "decode_distinct_32_over_base": {
            "measured": ratio,
            "target": 0.8,
            "met": ratio is not None and ratio >= 0.8,
        },
        "triton_lora_speedup_over_torch": {
            "measured": speedup,
            "basis": "cuda graph replay" if "torch_over_triton_graph" in lora else "eager step",
            "target": 3.0,
            "met": speedup is not None and speedup >= 3.0,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="everything up to where CUDA is needed")
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default: $OUT or bench-results/)"
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (model, adapters, wheels)")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run")
    parser.add_argument("--kernels-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kernels_only:
        kernels_main(args.dry_run)
        return 0

    started = time.monotonic()
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench-results" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.gettempdir()) / "loraserve-gpu-check"
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dry_run": args.dry_run, "machine": machine(), "steps": {}}
    path = out / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")

    def record(name: str, fn: Any, cap: float | None = None) -> None:
        left = args.budget - (time.monotonic() - started)
        if cap is not None and left < 20:
            report["steps"][name] = {"ok": False, "skipped": f"only {left:.0f} s of the budget left"}
            return
        t0 = time.monotonic()
        try:
            result = fn(min(cap, left - 10)) if cap is not None else fn()
            report["steps"][name] = {"ok": True, "seconds": round(time.monotonic() - t0, 1), "result": result}
        except Exception as error:  # noqa: BLE001 - recorded, and the run goes on with the next step
            report["steps"][name] = {
                "ok": False,
                "seconds": round(time.monotonic() - t0, 1),
                "error": str(error),
            }
        report["goals"] = goals(report["steps"])
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        path.write_text(json.dumps(report, indent=2))
        status = "ok" if report["steps"][name]["ok"] else "FAILED"
        print(f"[{report['elapsed_s']:6.1f} s] {name}: {status}", flush=True)

    if not args.dry_run and not report["machine"].get("cuda_available"):
        print("no CUDA device: run with --dry-run", file=sys.stderr)
        return 2
    record("wheels", lambda: step_wheels(args.dry_run))
    record("sizes", step_sizes)
    record("install", lambda _cap: step_install(work, args.dry_run), CAPS["install"])
    # The kernel figures first (a goal, and quick), then the tests, then the model and the bench.
    record("kernels", lambda cap: step_kernels(work, out, args.dry_run, cap), CAPS["kernels"])
    record("tests", lambda cap: step_tests(work, out, args.dry_run, cap), CAPS["tests"])
    record("model", lambda cap: step_model(work, out, args.dry_run, cap), CAPS["model"])
    for scenario in ("decode-distinct", "poisson"):
        record(scenario, lambda cap, s=scenario: step_bench(work, out, s, args.dry_run, cap), CAPS[scenario])
    print(json.dumps(report["goals"], indent=2))
    print(f"report: {path}")
    return 0 if all(step["ok"] for step in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
