"""The server config: flags and env vars for every field, validated once with clear messages."""

from __future__ import annotations

import pytest

from loraserve.cli import build_parser
from loraserve.config import ConfigError, ServerConfig, is_loopback, load_config

CONTRACT_FLAGS = [
    "--model",
    "--adapters-dir",
    "--host",
    "--port",
    "--metrics-port",
    "--quantization",
    "--device",
    "--compute-dtype",
    "--max-loaded-adapters",
    "--max-lora-rank",
    "--api-keys-file",
]


def test_every_field_is_a_serve_flag() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {opt for action in serve._actions for opt in action.option_strings}
    for name in ServerConfig.model_fields:
        assert "--" + name.replace("_", "-") in flags
    assert set(CONTRACT_FLAGS) <= flags


def test_env_vars(monkeypatch, toy) -> None:
    monkeypatch.setenv("LORASERVE_MODEL", str(toy.base))
    monkeypatch.setenv("LORASERVE_MAX_LOADED_ADAPTERS", "5")
    monkeypatch.setenv("LORASERVE_LORA_TARGET_MODULES", '["q_proj", "v_proj"]')
    monkeypatch.setenv("LORASERVE_TENANT_WEIGHTS", '{"acme": 2}')
    config = load_config()
    assert config.model == str(toy.base.resolve()) and config.max_loaded_adapters == 5
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.tenant_weights == {"acme": 2.0}
    assert load_config(max_loaded_adapters=9).max_loaded_adapters == 9  # explicit values win
    monkeypatch.setenv("LORASERVE_LORA_TARGET_MODULES", "q_proj, o_proj")
    assert load_config().lora_target_modules == ["q_proj", "o_proj"]


def test_defaults_match_the_design() -> None:
    config = ServerConfig()
    assert (config.host, config.port, config.metrics_port, config.quantization) == (
        "127.0.0.1",
        50051,
        9090,
        "nf4",
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("compute_dtype", "float8", "--compute-dtype"),
        ("device", "tpu", "--device"),
        ("kv_cache_memory_fraction", 2.0, "--kv-cache-memory-fraction"),
        ("tls_key_file", "/x.key", "tls_key_file: file not found"),
        ("tenant_weights", {"a": 0}, "tenant_weights['a'] must be > 0"),
        ("adapters_dir", "/no/such/dir", "adapter store directory not found"),
        ("ray_http_port", 0, "--ray-http-port"),
        ("ray_dashboard_port", 70000, "--ray-dashboard-port"),
    ],
)
def test_invalid_values_name_the_option(field, value, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(**{field: value})


def test_ray_serve_ports_are_flags_and_env_vars(monkeypatch) -> None:
    serve_ray = build_parser()._subparsers._group_actions[0].choices["serve-ray"]
    flags = {opt for action in serve_ray._actions for opt in action.option_strings}
    ray_flags = {"--ray-http-host", "--ray-http-port", "--ray-dashboard-port", "--ray-metrics-export-port"}
    assert ray_flags <= flags
    config = ServerConfig()
    assert (config.ray_http_host, config.ray_http_port, config.ray_dashboard_port) == ("127.0.0.1", 8000, 0)
    monkeypatch.setenv("LORASERVE_RAY_HTTP_PORT", "8100")
    assert load_config().ray_http_port == 8100


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")
