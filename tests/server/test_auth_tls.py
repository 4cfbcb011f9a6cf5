"""API keys (hashed, per tenant, adapter globs, admin rights), TLS and mTLS end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loraserve.auth import hash_key, key_entry_toml
from loraserve.config import ConfigError, load_config
from loraserve_client import Client, PermissionDenied, Unauthenticated, Unavailable
from tests.helpers import ServerThread
from tests.server.certs import make_pki

ACME, OPS = "lsk_acme-secret-key", "lsk_ops-secret-key"


@pytest.fixture(scope="module")
def keyed_server(toy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    keys = folder / "keys.toml"
    keys.write_text(
        key_entry_toml(ACME, "acme", ["a1", "org/*"], admin=False)
        + "\n"
        + key_entry_toml(OPS, "ops", ["*"], admin=True, base_model=False)
    )
    with ServerThread(
        model=str(toy.base), adapters_dir=toy.store, api_keys_file=keys, kv_cache_bytes=2 << 20
    ) as srv:
        srv.keys_file = keys
        yield srv


def test_keys_are_stored_hashed(keyed_server) -> None:
    text = keyed_server.keys_file.read_text()
    assert ACME not in text and OPS not in text and hash_key(ACME) in text


def test_missing_wrong_and_malformed_keys(keyed_server) -> None:
    for key, metadata in ((None, []), ("lsk_wrong", []), (None, [("authorization", "Basic abc")])):
        with (
            Client(keyed_server.target, api_key=key, metadata=metadata, retries=0) as client,
            pytest.raises(Unauthenticated),
        ):
            client.generate("hi", "a1", max_new_tokens=2)
    with Client(keyed_server.target, retries=0) as client:
        assert client.health() == "SERVING"  # probes need no key
        with pytest.raises(Unauthenticated):
            client.list_adapters()


def test_tenant_permissions(keyed_server) -> None:
    with Client(keyed_server.target, api_key=ACME) as acme:
        assert acme.generate("hi", "a1", max_new_tokens=2).usage.completion_tokens == 2
        assert acme.generate("hi", "org/a2", max_new_tokens=2).usage.completion_tokens == 2
        assert acme.generate("hi", "", max_new_tokens=2).usage.completion_tokens == 2
        with pytest.raises(PermissionDenied, match="may not use adapter 'a3'"):
            acme.generate("hi", "a3", max_new_tokens=2)
        with pytest.raises(PermissionDenied, match="AdapterAdmin"):
            acme.load_adapter("a1")
    with Client(keyed_server.target, api_key=OPS) as ops:
        assert ops.load_adapter("a3").adapter.state == "device"
        assert ops.generate("hi", "a3", max_new_tokens=2).usage.completion_tokens == 2
        with pytest.raises(PermissionDenied, match="base model"):
            ops.generate("hi", "", max_new_tokens=2)


def test_non_loopback_bind_needs_keys_or_an_explicit_opt_in(toy) -> None:
    with pytest.raises(ConfigError, match="not loopback"):
        load_config(model=str(toy.base), host="0.0.0.0")
    assert (
        load_config(model=str(toy.base), host="0.0.0.0", allow_unauthenticated_remote=True).host == "0.0.0.0"
    )


def test_non_loopback_metrics_need_keys_or_an_explicit_opt_in(toy, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"metrics_host 0\.0\.0\.0 is not loopback"):
        load_config(model=str(toy.base), metrics_host="0.0.0.0")
    keys = tmp_path / "keys.toml"
    keys.write_text(key_entry_toml(ACME, "acme", ["*"], admin=False))
    assert (
        load_config(model=str(toy.base), metrics_host="0.0.0.0", api_keys_file=keys).metrics_host == "0.0.0.0"
    )
    opted_in = load_config(model=str(toy.base), metrics_host="0.0.0.0", allow_unauthenticated_remote=True)
    assert opted_in.metrics_host == "0.0.0.0"
    assert load_config(model=str(toy.base), metrics_host="0.0.0.0", metrics_port=0).metrics_port == 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls(toy, pki) -> None:
    with ServerThread(
        model=str(toy.base),
        tls_cert_file=pki["server.pem"],
        tls_key_file=pki["server.key"],
        kv_cache_bytes=2 << 20,
    ) as srv:
        with Client(srv.target, ca_cert=pki["ca.pem"]) as client:
            assert client.generate("hi", max_new_tokens=2).usage.completion_tokens == 2
        with Client(srv.target, retries=0, timeout=60) as plain, pytest.raises(Unavailable):
            plain.generate("hi", max_new_tokens=2)


def test_mtls_with_the_client_and_the_cli(toy, pki) -> None:
    with ServerThread(
        model=str(toy.base),
        tls_cert_file=pki["server.pem"],
        tls_key_file=pki["server.key"],
        tls_client_ca_file=pki["ca.pem"],
        kv_cache_bytes=2 << 20,
    ) as srv:
        with Client(
            srv.target, ca_cert=pki["ca.pem"], client_cert=pki["client.pem"], client_key=pki["client.key"]
        ) as client:
            assert client.generate("hi", max_new_tokens=2).usage.completion_tokens == 2
        with (
            Client(srv.target, ca_cert=pki["ca.pem"], retries=0, timeout=60) as anonymous,
            pytest.raises(Unavailable),
        ):
            anonymous.generate("hi", max_new_tokens=2)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "loraserve.cli",
                "health",
                "--target",
                srv.target,
                "--ca-cert",
                str(pki["ca.pem"]),
                "--client-cert",
                str(pki["client.pem"]),
                "--client-key",
                str(pki["client.key"]),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0 and run.stdout.strip() == "SERVING", run.stderr


def test_a_key_that_is_not_the_certificates_is_named(toy, pki) -> None:
    with pytest.raises(
        ConfigError, match=r"tls_key_file: .*client\.key is not the private key of the certificate"
    ):
        load_config(model=str(toy.base), tls_cert_file=pki["server.pem"], tls_key_file=pki["client.key"])


@pytest.mark.parametrize(
    "cert, key, message",
    [
        ("server.key", "server.key", "tls_cert_file: .* holds no PEM certificate"),
        ("server.pem", "server.pem", "tls_key_file: .* holds no PEM private key"),
    ],
)
def test_swapped_tls_files_are_named(toy, pki, cert, key, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(model=str(toy.base), tls_cert_file=pki[cert], tls_key_file=pki[key])


def test_a_client_ca_that_is_not_a_certificate_is_named(toy, pki) -> None:
    with pytest.raises(ConfigError, match=r"tls_client_ca_file: .* holds no PEM certificate"):
        load_config(
            model=str(toy.base),
            tls_cert_file=pki["server.pem"],
            tls_key_file=pki["server.key"],
            tls_client_ca_file=pki["client.key"],
        )


def test_tls_mismatch_stops_serve_with_one_line(toy, pki) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraserve.cli",
            "serve",
            "--model",
            str(toy.base),
            "--tls-cert-file",
            str(pki["server.pem"]),
            "--tls-key-file",
            str(pki["client.key"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "is not the private key of the certificate" in run.stderr and "cannot bind" not in run.stderr
