"""The guard every front end shares: admission by phase and API key, edge checks of adapter ids,
and failures turned into public errors (internal details never reach the client)."""

from __future__ import annotations

import logging

import pytest

from loraserve.auth import KeyRing, Principal, hash_key
from loraserve.errors import (
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from loraserve.guard import DRAINING, SERVING, Guard, describe
from loraserve.metrics import Metrics


def errors(metrics: Metrics, code: str) -> float:
    return metrics.request_errors.labels(code)._value.get()


def test_calls_are_refused_while_starting_and_draining() -> None:
    guard = Guard(None, Metrics())
    with pytest.raises(Unavailable, match="starting"):
        guard.admit([])
    guard.phase = SERVING
    assert guard.admit([]).tenant == ""
    guard.phase = DRAINING
    with pytest.raises(Unavailable, match="shutting down"):
        guard.admit([])


def test_api_keys_and_admin_rights(tmp_path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\ntenant = "acme"\nkey_sha256 = "{hash_key("lsk_acme")}"\nadapters = ["acme/*"]\n'
    )
    guard = Guard(KeyRing.from_file(keys), Metrics(), phase=SERVING)
    with pytest.raises(Unauthenticated, match="missing API key"):
        guard.admit([])
    assert guard.admit([("authorization", "Bearer lsk_acme")]).tenant == "acme"
    with pytest.raises(PermissionDenied, match="AdapterAdmin"):
        guard.admit([("authorization", "Bearer lsk_acme")], admin=True)


def test_adapter_ids_are_checked_at_the_edge() -> None:
    call = Guard(None, None).open("Generate")
    assert Guard.adapter(call, "") == "" and Guard.adapter(call, "org/a2") == "org/a2"
    with pytest.raises(InvalidArgument, match="adapter_id: adapter_id must not contain"):
        Guard.adapter(call, "../x")
    call.principal = Principal("acme", adapters=("acme/*",), base_model=False)
    with pytest.raises(PermissionDenied, match="may not use adapter 'other'"):
        Guard.adapter(call, "other")
    with pytest.raises(PermissionDenied, match="base model"):
        Guard.adapter(call, "")
    assert Guard.admin_adapter("org/a2") == "org/a2"
    with pytest.raises(InvalidArgument, match="adapter_id is empty"):
        Guard.admin_adapter("")
    with pytest.raises(InvalidArgument, match="at most two segments"):
        Guard.admin_adapter("a/b/c")


def test_failures_become_public_errors_and_are_counted(caplog) -> None:
    metrics = Metrics()
    guard = Guard(None, metrics, phase=SERVING)
    call = guard.open("/loraserve.v1.Inference/Generate")
    public = guard.fail(call, NotFound("adapter 'x' not found"))
    assert (public.code, public.message) == ("NOT_FOUND", "adapter 'x' not found")
    with caplog.at_level(logging.ERROR):
        hidden = guard.fail(call, RuntimeError("secret path /srv/x"))
    assert isinstance(hidden, InternalError) and call.request_id in hidden.message
    assert "secret" not in hidden.message and "secret path /srv/x" in caplog.text
    assert guard.fail(call, InternalError("detail")).message == hidden.message
    guard.cancelled(call, deadline_passed=True)
    guard.cancelled(call, deadline_passed=False)
    counts = {
        code: errors(metrics, code) for code in ("NOT_FOUND", "INTERNAL", "DEADLINE_EXCEEDED", "CANCELLED")
    }
    assert counts == {"NOT_FOUND": 1, "INTERNAL": 2, "DEADLINE_EXCEEDED": 1, "CANCELLED": 1}


def test_errors_without_a_message_are_still_described() -> None:
    assert describe(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert describe(ValueError("bad")) == "ValueError: bad"
    assert Guard(None, None).open("m").request_id != Guard(None, None).open("m").request_id
