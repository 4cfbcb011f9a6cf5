"""What ships: the Dockerfile (parsed with the official Go parser; no Docker engine here), the
build context that .dockerignore lets through, and the server's wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import dockerfile

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_contract() -> None:
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    by_cmd: dict[str, list] = {}
    for command in commands:
        by_cmd.setdefault(command.cmd.upper(), []).append(command.value)
    assert by_cmd["FROM"][0][0].startswith("nvidia/cuda:") and ":" in by_cmd["FROM"][0][0]
    assert by_cmd["USER"][-1] == ("loraserve",)  # runs as non-root
    assert set(by_cmd["EXPOSE"][0]) == {"50051", "8000", "9090"}
    health = by_cmd["HEALTHCHECK"][0]
    assert health[0] == "CMD" and health[1:3] == ("loraserve", "health")
    copied = {value[0] for value in by_cmd["COPY"]}
    for package in ("server", "adapters", "clients", "benchmarks", "proto", "pyproject.toml"):
        assert package in copied, f"{package} is not copied into the image"
    torch_install = next(v[0] for v in by_cmd["RUN"] if "torch==" in v[0])
    assert "--index-url" in torch_install  # a CUDA build, not the CPU wheel


def _docker_excluded(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: a path is left out when it or a folder above it matches a
    pattern (`*` within one segment, `**` across segments)."""
    regexes = []
    for pattern in patterns:
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
        table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        regexes.append(re.compile("".join(table.get(p, re.escape(p)) for p in parts) + r"\Z"))
    segments = path.split("/")
    prefixes = ["/".join(segments[: i + 1]) for i in range(len(segments))]
    return any(r.match(prefix) for r in regexes for prefix in prefixes)


def test_dockerignore_leaves_out_nested_build_output() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stray in (
        "clients/build/lib/loraserve_client/cli.py",
        "clients/loraserve_client.egg-info/PKG-INFO",
        "build/lib/loraserve/cli.py",
        "server/__pycache__/cli.cpython-311.pyc",
        "clients/dist/loraserve_client-0.1.0.whl",
        ".venv/bin/python",
    ):
        assert _docker_excluded(stray, patterns), stray
    for source in ("server/cli.py", "server/demo/build.py", "clients/api/loraserve_pb2.py", "pyproject.toml"):
        assert not _docker_excluded(source, patterns), source


def test_wheel_holds_only_the_declared_packages(tmp_path) -> None:
    """A stray build copy left by `pip install ./clients` must not end up in the server's wheel."""
    source = tmp_path / "src"  # the source tree as a fresh clone plus new files would have it
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    stray = source / "clients" / "build" / "lib" / "loraserve_client"
    stray.mkdir(parents=True)
    (stray / "stray_copy.py").write_text("STRAY = True\n")
    (source / "clients" / "loraserve_client.egg-info").mkdir()
    (source / "clients" / "loraserve_client.egg-info" / "SOURCES.txt").write_text("stray_copy.py\n")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            ".",
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("loraserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if "stray" in n or "/build/" in n or "egg-info" in n]
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"loraserve", "loraserve_client"}
