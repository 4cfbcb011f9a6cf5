"""The Dockerfile, checked by reading (no Docker engine here): parsed with the official Go parser."""

from __future__ import annotations

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
    assert set(by_cmd["EXPOSE"][0]) == {"50051", "9090"}
    health = by_cmd["HEALTHCHECK"][0]
    assert health[0] == "CMD" and health[1:3] == ("loraserve", "health")
    copied = {value[0] for value in by_cmd["COPY"]}
    for package in ("server", "adapters", "clients", "benchmarks", "proto", "pyproject.toml"):
        assert package in copied, f"{package} is not copied into the image"
    torch_install = next(v[0] for v in by_cmd["RUN"] if "torch==" in v[0])
    assert "--index-url" in torch_install  # a CUDA build, not the CPU wheel
