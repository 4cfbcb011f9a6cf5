"""The GGUF conversion cache is readable by other users, as the umask allows (the weights too).

Reading the checkpoint (`gguf.load_checkpoint`, transformers) is replaced: the test is about what
`convert` does with the files that `save_pretrained` writes (safetensors writes its weights
0600), not about dequantizing, which tests/test_gguf.py covers on the real SmolLM2 file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraserve import gguf


class _Saved:
    """Stands in for a model or tokenizer: save_pretrained writes a private file, as safetensors does."""

    def __init__(self, file_name: str) -> None:
        self.file_name = file_name
        self.hf_quantizer = object()
        self.config = type("Config", (), {})()

    def save_pretrained(self, folder: str | Path) -> None:
        fd = os.open(Path(folder) / self.file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_converted_folder_follows_the_umask(tmp_path: Path, monkeypatch, umask: int) -> None:
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf, "check_supported", lambda path: "llama")
    monkeypatch.setattr(
        gguf, "load_checkpoint", lambda path: (_Saved("tokenizer.json"), _Saved("model.safetensors"))
    )
    previous = os.umask(umask)
    try:
        target = gguf.convert(source, tmp_path / "cache")
    finally:
        os.umask(previous)
    assert (target / gguf.MARKER).is_file() and (target / "model.safetensors").is_file()
    assert _modes(target) == {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}
