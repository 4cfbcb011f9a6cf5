"""The README and docs/ against the code: generated tables are current, every metric is named,
every command parses, every grpcurl body fits the proto, and nothing points outside the
repository. (The examples' outputs are checked against a running demo in tests/test_readme_demo.py.)"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from google.protobuf import json_format

from loraserve.cli import build_parser
from loraserve.metrics import Metrics
from loraserve_client import Client
from loraserve_client.api import loraserve_pb2 as pb2

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The demo's adapters are chat-trained: a raw `generate` prompt to them hits EOS at once.
CHAT_ADAPTERS = ("pt-en", "pt-sentiment", "support-bot", "en-pt")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_blocks(text: str, *languages: str) -> list[str]:
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if lang in languages]


def shell_commands(text: str) -> list[str]:
    """The command lines of the README's bash and console blocks, continuations joined."""
    commands = []
    for block in code_blocks(text, "bash", "console"):
        console = "\n$ " in "\n" + block
        pending = ""
        for line in block.splitlines():
            if console and not pending:
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                commands.append(pending.strip())
                pending = ""
    return commands


def loraserve_invocations(text: str) -> list[list[str]]:
    """argv (after the program name) of every `loraserve` / `loraserve-client` call."""
    found = []
    for command in shell_commands(text):
        for part in command.split("|"):
            words = shlex.split(part, comments=True)
            words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]  # leading env assignments
            if (
                words
                and words[0].rsplit("/", 1)[-1] in ("loraserve", "loraserve-client")
                and "..." not in words
            ):
                found.append(words[1:])
    return found


def test_config_table_is_current() -> None:
    readme = README.read_text()
    assert _script("config_table").replace_in(readme) == readme, (
        "run `python scripts/config_table.py --write`"
    )


def test_metrics_table_is_current() -> None:
    doc = (ROOT / "docs" / "api.md").read_text()
    assert _script("metrics_table").replace_in(doc) == doc, "run `python scripts/metrics_table.py --write`"


def test_readme_names_every_metric() -> None:
    section = README.read_text().split("## Metrics and logs", 1)[1].split("\n## ", 1)[0]
    names = [name.removeprefix("loraserve_") for name, *_ in _script("metrics_table").metrics()]
    assert len(names) == len([m for m in vars(Metrics()).values() if hasattr(m, "_name")])
    missing = [name for name in names if f"`{name}" not in section]
    assert not missing, f"README's metrics list misses {missing}"


def test_quickstart_commands() -> None:
    readme = README.read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in quickstart.strip().splitlines()] == [
        "make serve",
        "make test",
    ]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    assert {"serve", "test", "install", "lint", "format", "proto"} <= targets


# The design notes the developers keep beside the repository, which users never have. Spelt in
# pieces so that this file, which looks for them, does not itself contain them.
OUTSIDE_NAMES = ("../" + "shared", "DESIGN" + ".md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_stay_inside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    assert not any(name in text for name in OUTSIDE_NAMES)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_sources_cite_no_file_outside_the_repository() -> None:
    offenders = []
    for folder in ("server", "adapters", "clients", "benchmarks", "scripts", "tests", "deploy"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".json", ".yml", ".toml") and "build" not in path.parts:
                text = path.read_text(errors="replace")
                if any(name in text for name in OUTSIDE_NAMES):
                    offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_every_loraserve_command_in_the_readme_parses() -> None:
    invocations = loraserve_invocations(README.read_text())
    assert len(invocations) >= 10
    parser = build_parser()
    for argv in invocations:
        try:
            parser.parse_args(argv)
        except SystemExit as error:
            pytest.fail(f"README command does not parse: loraserve {' '.join(argv)} ({error})")


def test_chat_trained_adapters_are_asked_with_chat() -> None:
    """`generate -a pt-en "o gato preto"` prints an empty line: the adapter expects the chat template."""
    for argv in loraserve_invocations(README.read_text()):
        adapter = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-a", "--adapter")), "")
        if adapter in CHAT_ADAPTERS:
            assert argv[0] == "chat", f"loraserve {' '.join(argv)}: ask a chat-trained adapter with chat"


def test_grpcurl_examples_fit_the_proto() -> None:
    readme = README.read_text()
    methods = {
        "Inference/Generate": pb2.GenerateRequest,
        "Inference/GenerateStream": pb2.GenerateRequest,
        "Inference/Chat": pb2.ChatRequest,
        "Inference/ChatStream": pb2.ChatRequest,
        "AdapterAdmin/LoadAdapter": pb2.LoadAdapterRequest,
    }
    checked = 0
    for command in shell_commands(readme):
        words = shlex.split(command, comments=True)
        if words[:1] != ["grpcurl"] or "-d" not in words:
            continue
        method = words[-1].removeprefix("loraserve.v1.")
        json_format.Parse(words[words.index("-d") + 1], methods[method]())  # unknown fields raise
        checked += 1
    assert checked >= 4
    response = re.search(r"Inference/Chat\n(\{.*?\n\})", readme, re.S).group(1)
    json_format.Parse(response, pb2.GenerateResponse())


def test_python_client_examples_use_real_methods() -> None:
    snippets = code_blocks(README.read_text(), "python")
    assert len(snippets) == 2  # the client, and training on the running server
    for snippet in snippets:
        compile(snippet, "README.md", "exec")
        assert "from loraserve_client import" in snippet
        for method in set(re.findall(r"client\.(\w+)\(", snippet)):
            assert callable(getattr(Client, method, None)), method
