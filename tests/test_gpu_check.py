"""scripts/gpu_check.py pieces that run without a GPU or a network: the bitsandbytes trim keeps a
valid wheel, loraserve imports through the link tree, what travels stays under 64 MiB, and the
goals are read from the steps' results."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bitsandbytes_trim_keeps_cuda_13_and_cpu_and_a_true_record(gpu_check, tmp_path) -> None:
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2026", "cpu"]
    files = {f"bitsandbytes/libbitsandbytes_{lib}.so": b"x" * 10 for lib in libs}
    files["bitsandbytes/__init__.py"] = b""
    record = "".join(f"{name},sha256=0,10\n" for name in files) + "bitsandbytes-0.50.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    gpu_check.strip_bitsandbytes(wheel)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        kept_record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    kept = {f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cuda128", "cuda130", "cuda132", "cpu")}
    assert names == kept | {"bitsandbytes/__init__.py", "bitsandbytes-0.50.2.dist-info/RECORD"}
    listed = {line.split(",")[0] for line in kept_record.splitlines()}
    assert listed == names


def test_loraserve_imports_through_the_link_tree(gpu_check, tmp_path) -> None:
    src = gpu_check.link_tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)])}
    probe = (
        "import loraserve, loraserve.adapters.lora_backends, loraserve.benchmarks.models, loraserve_client\n"
        "print(loraserve.__file__, loraserve.adapters.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out[0] == str(src / "loraserve" / "__init__.py")
    assert out[1] == str(src / "loraserve" / "adapters" / "__init__.py")


def test_what_travels_is_measured_against_64_mib(gpu_check) -> None:
    sizes = gpu_check.step_sizes()
    assert sizes["tree_bytes"] > 0 and sizes["total_mib"] < sizes["limit_mib"] == 64


def test_goals_read_the_decode_ratio_and_the_kernel_speedup(gpu_check) -> None:
    steps = {
        "decode-distinct": {
            "result": {
                "systems": {
                    "engine": {"steady_decode_tokens_per_s": 850.0},
                    "engine-base": {"steady_decode_tokens_per_s": 1000.0},
                }
            }
        },
        "kernels": {"result": {"lora": {"torch_over_triton_eager": 1.5, "torch_over_triton_graph": 3.2}}},
    }
    goals = gpu_check.goals(steps)
    assert goals["decode_distinct_32_over_base"] == {"measured": 0.85, "target": 0.8, "met": True}
    speedup = goals["triton_lora_speedup_over_torch"]
    assert (speedup["measured"], speedup["basis"], speedup["met"]) == (3.2, "cuda graph replay", True)
    del steps["kernels"]["result"]["lora"]["torch_over_triton_graph"]
    speedup = gpu_check.goals(steps)["triton_lora_speedup_over_torch"]
    assert (speedup["measured"], speedup["basis"], speedup["met"]) == (1.5, "eager step", False)
    assert gpu_check.goals({})["decode_distinct_32_over_base"]["met"] is False
