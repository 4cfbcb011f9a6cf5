"""The checked-in stubs match the proto (regenerate with `make proto`), and the contract names hold."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loraserve_client.api import loraserve_pb2 as pb2

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_up_to_date(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path in module.generate(tmp_path):
        checked_in = ROOT / "clients" / "api" / path.name
        assert checked_in.read_text() == path.read_text(), f"{path.name} is stale: run `make proto`"


def test_contract_names() -> None:
    services = pb2.DESCRIPTOR.services_by_name
    assert [m.name for m in services["Inference"].methods] == [
        "Generate",
        "GenerateStream",
        "Chat",
        "ChatStream",
        "Tokenize",
        "ModelInfo",
    ]
    assert [m.name for m in services["AdapterAdmin"].methods] == [
        "LoadAdapter",
        "UnloadAdapter",
        "ListAdapters",
    ]
    fields = {
        name: [f.name for f in message.fields]
        for name, message in pb2.DESCRIPTOR.message_types_by_name.items()
    }
    assert fields["GenerateRequest"][:4] == ["adapter_id", "prompt", "sampling", "stopping"]
    assert fields["SamplingParams"][:5] == ["temperature", "top_k", "top_p", "seed", "repetition_penalty"]
    assert fields["StoppingCriteria"][:2] == ["max_new_tokens", "stop_sequences"]
    assert fields["GenerateResponse"][:4] == ["text", "token_ids", "finish_reason", "usage"]
    assert fields["ChatRequest"][:4] == ["adapter_id", "messages", "sampling", "stopping"]
    assert fields["ChatMessage"] == ["role", "content"]
    assert fields["LoadAdapterRequest"] == ["adapter_id", "pin"]
    assert fields["UnloadAdapterRequest"] == ["adapter_id"]
    assert fields["ListAdaptersResponse"] == ["adapters"]


def test_every_field_has_a_comment() -> None:
    lines = (ROOT / "proto" / "loraserve" / "v1" / "loraserve.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        is_field = (
            stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "syntax", "//"))
        )
        if is_field:
            assert lines[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {stripped}"
