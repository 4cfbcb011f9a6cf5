"""The CLI driven as a subprocess against a real server; the client imports without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from loraserve.auth import KeyRing
from loraserve.errors import PermissionDenied
from loraserve_client import Client
from tests.helpers import free_port

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'bitsandbytes'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def cli(*args: str, stdin: str | None = None, blocked: bool = False) -> subprocess.CompletedProcess:
    code = (
        BLOCK_TORCH if blocked else ""
    ) + "import sys\nfrom loraserve.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_generate_streams_and_prints_json(server, client: Client) -> None:
    expected = client.generate("hello world", "a1", max_new_tokens=6)
    run = cli("generate", "--target", server.target, "-a", "a1", "-n", "6", "hello world")
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected.text + "\n"
    run = cli("generate", "--target", server.target, "-a", "a1", "-n", "6", "--json", "hello world")
    result = json.loads(run.stdout)
    assert result["token_ids"] == expected.token_ids and result["finish_reason"] == expected.finish_reason


def test_adapters_list_load_unload(server) -> None:
    run = cli("adapters", "load", "a4", "--target", server.target)
    assert run.returncode == 0 and run.stdout.startswith("loaded a4 in"), run.stderr
    run = cli("adapters", "list", "--target", server.target)
    assert run.stdout.splitlines()[0].split()[:3] == ["ADAPTER", "STATE", "RANK"]
    assert any(line.split()[:2] == ["a4", "device"] for line in run.stdout.splitlines())
    rows = json.loads(cli("adapters", "list", "--all", "--json", "--target", server.target).stdout)
    assert {"a1", "org/a2", "a3", "a4", "a5", "a6"} <= {row["adapter_id"] for row in rows}
    run = cli("adapters", "unload", "a4", "--target", server.target)
    assert run.returncode == 0 and run.stdout.strip() == "unloaded a4"


def test_chat_repl_two_turns_with_an_adapter_switch(server, client: Client) -> None:
    run = cli(
        "chat",
        "--target",
        server.target,
        "-a",
        "a1",
        "-n",
        "5",
        "--json",
        stdin="hi there\n/adapter org/a2\nand now?\n/exit\n",
    )
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert [e["adapter"] for e in events] == ["a1", "org/a2", "org/a2"]
    first = client.chat([("user", "hi there")], "a1", max_new_tokens=5)
    assert events[0]["text"] == first.text
    history = [("user", "hi there"), ("assistant", first.text), ("user", "and now?")]
    assert events[2]["text"] == client.chat(history, "org/a2", max_new_tokens=5).text
    streamed = cli("chat", "--target", server.target, "-a", "a1", "-n", "5", stdin="hi there\n")
    assert streamed.returncode == 0 and streamed.stdout == first.text + "\n"


def test_errors_are_one_line_and_non_zero(server) -> None:
    run = cli("generate", "--target", server.target, "-a", "nope", "hi")
    assert run.returncode == 1
    assert run.stderr.strip() == "loraserve: NOT_FOUND: adapter 'nope' not found in the adapter store"
    run = cli("health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "10")
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "UNAVAILABLE" in run.stderr
    assert "Traceback" not in run.stderr


def test_client_and_client_commands_work_without_torch(server) -> None:
    imports = "import loraserve_client.cli\nfrom loraserve_client import Client, AsyncClient\n"
    code = BLOCK_TORCH + imports + "print('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "ok", run.stderr
    run = cli("health", "--target", server.target, blocked=True)
    assert run.returncode == 0 and run.stdout.strip() == "SERVING", run.stderr
    run = cli("generate", "--target", server.target, "-n", "3", "hello", blocked=True)
    assert run.returncode == 0, run.stderr


def test_client_distribution_installs_alone(server, tmp_path) -> None:
    """`pip install ./clients` in a fresh venv: no torch, and its CLI talks to the server."""
    import venv
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    # pip builds in the source folder: install from a copy, so that no clients/build/ is left behind.
    source = tmp_path / "clients"
    shutil.copytree(
        root / "clients", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = subprocess.run(
        [str(env_dir / "bin" / "pip"), "install", "-q", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr
    listed = subprocess.run([str(env_dir / "bin" / "pip"), "list"], capture_output=True, text=True).stdout
    assert "torch" not in listed and "transformers" not in listed and "loraserve-client" in listed
    run = subprocess.run(
        [
            str(env_dir / "bin" / "loraserve-client"),
            "generate",
            "--target",
            server.target,
            "-n",
            "3",
            "--json",
            "hello",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["token_ids"]) == 3


CLIENT_SCRIPT = "import sys\nfrom loraserve_client.cli import main\nsys.exit(main(sys.argv[1:]))"
SERVER_SCRIPT = "import sys\nfrom loraserve.cli import main\nsys.exit(main(sys.argv[1:]))"


def into_closed_pipe(script: str, *args: str) -> subprocess.CompletedProcess:
    """Runs a console script with stdout a pipe whose reader has already gone (`| head` after
    its line): every write fails with EPIPE, deterministically."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-c", script, *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize("script", [SERVER_SCRIPT, CLIENT_SCRIPT], ids=["loraserve", "loraserve-client"])
def test_a_closed_stdout_stops_the_command_quietly(server, script: str) -> None:
    for args in (
        ("generate", "--target", server.target, "-a", "a1", "-n", "6", "hello world"),
        ("adapters", "list", "--all", "--target", server.target),
        ("--help",),
    ):
        run = into_closed_pipe(script, *args)
        assert run.returncode in (0, 141), (args, run.returncode, run.stderr)
        assert "Broken pipe" not in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert "Exception ignored" not in run.stderr, run.stderr
    assert into_closed_pipe(script, "health", "--target", server.target).returncode == 141


def test_keygen_says_whether_the_key_may_use_the_base_model(tmp_path) -> None:
    run = cli("keygen", "--tenant", "acme", "--adapters", "acme/*")
    assert run.returncode == 0, run.stderr
    assert "base_model = true" in run.stdout and "may also call the base model" in run.stderr
    key = next(line[2:] for line in run.stderr.splitlines() if line.startswith("# lsk_"))
    keys = tmp_path / "keys.toml"
    keys.write_text(run.stdout)
    principal = KeyRing.from_file(keys).authenticate([("authorization", f"Bearer {key}")])
    principal.check_adapter("")  # the base model: allowed by default
    principal.check_adapter("acme/x")
    with pytest.raises(PermissionDenied):
        principal.check_adapter("globex/x")

    run = cli("keygen", "--tenant", "acme", "--adapters", "acme/*", "--no-base-model")
    assert "base_model = false" in run.stdout and "may not call the base model" in run.stderr
    key = next(line[2:] for line in run.stderr.splitlines() if line.startswith("# lsk_"))
    keys.write_text(run.stdout)
    principal = KeyRing.from_file(keys).authenticate([("authorization", f"Bearer {key}")])
    with pytest.raises(PermissionDenied, match="base model"):
        principal.check_adapter("")
    principal.check_adapter("acme/x")
