"""`loraserve train`: QLoRA on a tiny model, data errors with line numbers, files other users can
read (umask modes), and an unreadable model named as such."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve.adapters.training import DataError, TrainConfig, encode, read_jsonl, train
from loraserve.model_loader import load_tokenizer
from loraserve_client import Client
from tests.helpers import ServerThread


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_qlora_training_lowers_the_loss_and_the_adapter_serves(toy, tmp_path: Path) -> None:
    rows = [
        {"prompt": f"copy {w}:", "completion": f" {w} {w}"}
        for w in ["cat", "dog", "sun", "sea", "red", "map"] * 4
    ]
    rows += [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    ] * 4
    data = _write(tmp_path / "train.jsonl", rows)
    store = tmp_path / "store"
    config = TrainConfig(
        model=str(toy.base),
        data=data,
        adapters_dir=store,
        adapter_id="team/copy",
        rank=4,
        alpha=8,
        lr=1e-2,
        steps=40,
        batch_size=8,
        quiet=True,
        eval_fraction=0.1,
        eval_max_new_tokens=4,
    )
    result = train(config)
    assert sum(result.losses[-5:]) / 5 < 0.6 * sum(result.losses[:5]) / 5, result.losses
    folder = store / "team" / "copy"
    assert {"adapter_config.json", "adapter_model.safetensors", "loraserve_training.json"} <= {
        p.name for p in folder.iterdir()
    }
    metadata = json.loads((folder / "loraserve_training.json").read_text())
    assert len(metadata["data_sha256"]) == 64 and metadata["loss_curve"] == result.losses
    assert metadata["eval"]["examples"] == result.eval_examples > 0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(toy.base)), str(folder)
    )  # loads in PEFT
    with (
        ServerThread(model=str(toy.base), adapters_dir=store, kv_cache_bytes=2 << 20) as srv,
        Client(srv.target) as c,
    ):
        answer = c.generate("copy cat:", "team/copy", max_new_tokens=3)
        base = c.generate("copy cat:", "", max_new_tokens=3)
        assert answer.token_ids != base.token_ids
        assert c.list_adapters()[0].adapter_id == "team/copy"


def test_chat_labels_cover_only_assistant_turns(toy) -> None:
    from loraserve.adapters.training import Example

    tokenizer = load_tokenizer(str(toy.base))
    example = Example(
        1,
        messages=(
            ("system", "be brief"),
            ("user", "hi"),
            ("assistant", "yo"),
            ("user", "ok?"),
            ("assistant", "sure"),
        ),
    )
    ids, labels = encode(tokenizer, example, 256)
    learned = tokenizer.decode([i for i, label in zip(ids, labels) if label >= 0])
    assert learned.replace("</s>", "|") == "yo|sure|"


BAD = {
    "not JSON": (['{"prompt": "a", "completion": "b"}', "{oops"], ":2: not valid JSON"),
    "missing completion": (
        [{"prompt": "a", "completion": "b"}, {"prompt": "only"}],
        ":2: missing field 'completion'",
    ),
    "not an object": (["[1, 2]"], ":1: each line must be a JSON object"),
    "wrong type": ([{"prompt": 3, "completion": "b"}], ":1: field 'prompt' must be a string"),
    "bad role": ([{"messages": [{"role": "bot", "content": "x"}]}], ":1: messages[0].role"),
    "last turn not assistant": ([{"messages": [{"role": "user", "content": "x"}]}], ":1: the last message"),
    "empty": ([], "the data set is empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_names_the_line(case: str, tmp_path: Path) -> None:
    rows, message = BAD[case]
    path = _write(tmp_path / "bad.jsonl", rows) if rows else tmp_path / "bad.jsonl"
    if not rows:
        path.write_text("\n\n")
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_jsonl(path)


def test_cli_reports_bad_data_in_one_line(toy, tmp_path: Path) -> None:
    data = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "not json"])
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraserve.cli",
            "train",
            "--model",
            str(toy.base),
            "--data",
            str(data),
            "--adapters-dir",
            str(tmp_path / "store"),
            "--adapter-id",
            "x",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "bad.jsonl:2: not valid JSON" in run.stderr


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_trained_adapter_files_follow_the_umask(toy, tmp_path: Path, umask: int) -> None:
    """Not mkdtemp's 0700 nor safetensors' 0600: a container's other user must read the store."""
    data = _write(tmp_path / "train.jsonl", [{"prompt": "copy cat:", "completion": " cat"}] * 4)
    config = TrainConfig(
        model=str(toy.base),
        data=data,
        adapters_dir=tmp_path / "store",
        adapter_id="team/perm",
        rank=2,
        steps=1,
        batch_size=2,
        quiet=True,
        eval_fraction=0.0,
    )
    previous = os.umask(umask)
    try:
        train(config)
    finally:
        os.umask(previous)
    folder = tmp_path / "store" / "team" / "perm"
    assert (folder / "adapter_model.safetensors").is_file()
    assert _modes(folder) == {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}


def _without_permission_override() -> None:
    """Runs in the child before exec: as root, drop the capabilities that bypass file modes
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding set, so the exec'd program gets
    EACCES like any other user would."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_as_another_user(code: str, path: Path, timeout: float) -> subprocess.CompletedProcess:
    """Runs `python -c code path` with file modes enforced even as root (the user running the
    tests may be root, whom modes never stop)."""
    return subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_without_permission_override if os.geteuid() == 0 else None,
    )


def test_an_unreadable_model_is_reported_as_permission_denied(toy, tmp_path: Path) -> None:
    model = tmp_path / "base"
    shutil.copytree(toy.base, model)
    weights = model / "model.safetensors"
    weights.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(weights, 65534, 65534)  # someone else's private file, as a host user's is
    else:
        weights.chmod(0o000)
    code = (
        "import sys\n"
        "from loraserve.config import ConfigError\n"
        "from loraserve.model_loader import load_base_model\n"
        "try:\n"
        "    load_base_model(sys.argv[1], 'none', 'cpu')\n"
        "except ConfigError as error:\n"
        "    print(error)\n"
    )
    run = run_as_another_user(code, model, timeout=300)
    assert "permission denied reading" in run.stdout and "model.safetensors" in run.stdout, (
        run.stdout + run.stderr[-2000:]
    )
    assert "mode 0600" in run.stdout or "mode 0000" in run.stdout
    assert "No such file" not in run.stdout


@pytest.mark.parametrize("private", ["weights file", "adapter folder"])
def test_an_unreadable_adapter_is_reported_as_permission_denied(toy, tmp_path: Path, private: str) -> None:
    """The store's reader names the cause (as FAILED_PRECONDITION), never 'not found'."""
    store = tmp_path / "store"
    shutil.copytree(toy.store / "a1", store / "a1")
    path = store / "a1" / "adapter_model.safetensors" if private == "weights file" else store / "a1"
    path.chmod(0o600 if path.is_file() else 0o700)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)  # another user's private file or folder, as a host user's is
    else:
        path.chmod(0o000)
    code = (
        "import sys\n"
        "from loraserve.adapters.store import AdapterStore\n"
        "from loraserve.errors import ServeError\n"
        "try:\n"
        "    AdapterStore(sys.argv[1]).open('a1')\n"
        "except ServeError as error:\n"
        "    print(error.code, error.message)\n"
    )
    run = run_as_another_user(code, store, timeout=120)
    path.chmod(0o755)  # lets pytest remove the folder afterwards
    assert run.stdout.startswith("FAILED_PRECONDITION") and "permission denied" in run.stdout, (
        run.stdout + run.stderr[-2000:]
    )
