"""The install namespace: `loraserve` and `loraserve_client`, no generic top-level modules."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _declared() -> tuple[list[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools["packages"], setuptools["package-dir"]


def test_every_package_folder_is_declared() -> None:
    """A new subpackage under a mapped folder must be listed, or the wheel would miss it."""
    packages, package_dir = _declared()
    found = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "build" in rel.parts:
                continue
            dotted = ".".join((name, *rel.parts))
            # A folder mapped on its own (loraserve.adapters) is not also a child of its parent's folder;
            # its own subfolders (loraserve.adapters.lora_backends) are found under its mapping.
            nested = [p for p in package_dir if p.startswith(f"{name}.")]
            if not any(dotted == p or dotted.startswith(f"{p}.") for p in nested):
                found.add(dotted)
    assert sorted(found) == sorted(packages)


def test_only_the_two_namespaces_import_from_outside_the_repository(tmp_path) -> None:
    code = (
        "import importlib, pkgutil\n"
        "for bad in ('server', 'adapters', 'clients', 'benchmarks'):\n"
        "    try:\n"
        "        importlib.import_module(bad)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit(f'{bad} is importable')\n"
        "import loraserve, loraserve.adapters, loraserve.benchmarks, loraserve_client\n"
        "for root in (loraserve, loraserve.adapters, loraserve.benchmarks, loraserve_client):\n"
        "    for info in pkgutil.walk_packages(root.__path__, root.__name__ + '.'):\n"
        "        if info.name.endswith('ray_app'):\n"
        "            continue  # imports ray, an optional extra\n"
        "        importlib.import_module(info.name)\n"
        "import loraserve.adapters.store, loraserve.benchmarks.run, loraserve_client.api.loraserve_pb2\n"
        "print('ok')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert run.stdout.strip() == "ok", run.stdout + run.stderr
