"""loraserve on Ray Serve: N replicas of the engine behind Ray's gRPC proxy, adapters multiplexed.

Each replica runs a full loraserve engine (base model, slots, scheduler) on its own thread and
answers the same `loraserve.v1` methods as `loraserve serve`. Ray Serve's model multiplexing
routes a request by its `multiplexed_model_id` metadata (the adapter id, or `__base__`) to a
replica that already holds that adapter, so adapters stay where they are used instead of every
replica loading every adapter. `max_num_models_per_replica` (from config: the device slots) is
the routing budget; the replica's own tiers bound its memory as in `loraserve serve`.

Each replica is one more host of the same pieces as `loraserve serve`: an engine and its services
(loraserve.wiring), the gRPC servicers (loraserve.service) and the shared guard (loraserve.guard)
for admission, API keys and error reporting; only the transport glue below is Ray's.

The replica that answered is named in the trailing metadata `x-loraserve-replica`, the request
id in `x-request-id`. Errors keep their status codes (docs/api.md). Ray's proxy has no
grpc.health.v1: use Ray's own health check. Ray's gRPC proxy listens on every interface
(`[::]:port`) whatever `--host` says, so serve-ray without API keys needs
`--allow-unauthenticated-remote` (checked by `start`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from loraserve.config import ConfigError, ServerConfig
from loraserve.guard import SERVING, Guard
from loraserve.handlers import REQUEST_ID_HEADER, check_decoded, status_code
from loraserve.ids import BASE

log = logging.getLogger(__name__)
APP_NAME = "loraserve"
REPLICA_HEADER = "x-loraserve-replica"
BASE_MODEL_ID = BASE
SERVICER_FUNCTIONS = [
    "loraserve_client.api.loraserve_pb2_grpc.add_InferenceServicer_to_server",
    "loraserve_client.api.loraserve_pb2_grpc.add_AdapterAdminServicer_to_server",
]


def _routing_budget(config: ServerConfig) -> int:
    """Adapters Ray's multiplexing remembers per replica: the slot count, or auto's upper bound."""
    from loraserve.adapters.slot_sizing import MAX_AUTO_SLOTS

    slots = config.max_loaded_adapters
    return MAX_AUTO_SLOTS if slots == "auto" else int(slots)


def make_deployment(config: ServerConfig, replicas: int, num_cpus: float, num_gpus: float) -> Any:
    """The Ray Serve deployment class, configured (multiplexing budget, resources)."""
    from ray import serve

    @serve.deployment(
        name="LoraserveReplica",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max(config.max_num_seqs * 2, 16),
        health_check_period_s=5,
    )
    class LoraserveReplica:
        def __init__(self, config_json: str) -> None:
            from loraserve.auth import KeyRing
            from loraserve.engine.engine import Engine
            from loraserve.logs import setup_logging
            from loraserve.metrics import Metrics
            from loraserve.service import grpc_services
            from loraserve.wiring import Services, engine_parts

            self.config = ServerConfig.model_validate_json(config_json)
            cfg = self.config
            setup_logging(cfg.log_level, cfg.log_format)
            self.metrics = Metrics(cfg.metrics_max_adapter_labels)
            self.metrics_port = self._serve_metrics()
            self.engine = Engine.spawn(engine_parts(cfg), self.metrics, cfg.warmup).result()
            self.services = Services.build(cfg, self.engine, self.metrics, training=False)
            self.inference, self.admin, _ = grpc_services(self.services)
            keyring = KeyRing.from_file(cfg.api_keys_file) if cfg.api_keys_file else None
            self.guard = Guard(keyring, self.metrics, phase=SERVING)
            self.replica_id = serve.get_replica_context().replica_id.unique_id
            log.info(
                "replica %s ready (pid %d, metrics port %s)", self.replica_id, os.getpid(), self.metrics_port
            )

        def _serve_metrics(self) -> int | None:
            """Each replica's /metrics on the first free port from metrics_port (0: none)."""
            if not self.config.metrics_port:
                return None
            for port in range(self.config.metrics_port, self.config.metrics_port + 64):
                try:
                    self.metrics.serve(self.config.metrics_host, port)
                    return port
                except OSError:
                    continue
            return None

        # With auto slots the replica's count is known only once its engine sizes them: route by the most.
        @serve.multiplexed(max_num_models_per_replica=_routing_budget(config))
        async def hold_adapter(self, adapter_id: str) -> str:
            """Ray's multiplexing hook: puts the adapter in a device slot of this replica."""
            if adapter_id != BASE_MODEL_ID:
                await self.services.admin.load(adapter_id)
            return adapter_id

        async def _hold_routed_adapter(self, call: Any) -> None:
            """Holds the adapter Ray routed by, once checked at the edge like any adapter id."""
            routed = serve.get_multiplexed_model_id() or BASE_MODEL_ID
            if routed != BASE_MODEL_ID:
                Guard.adapter(call, routed)
            await self.hold_adapter(routed)

        def _open(self, name: str, grpc_context: Any) -> Any:
            call = self.guard.open(name)  # no deadline: Ray's proxy enforces request_timeout_s
            grpc_context.set_trailing_metadata(
                [(REPLICA_HEADER, self.replica_id), (REQUEST_ID_HEADER, call.request_id)]
            )
            return call

        def _admit(self, call: Any, request: Any, grpc_context: Any, admin: bool) -> None:
            call.principal = self.guard.admit(grpc_context.invocation_metadata(), admin)
            check_decoded(request)

        def _report(self, grpc_context: Any, call: Any, error: Exception) -> None:
            """Sets the status of a failed call on Ray's context (the caller re-raises)."""
            public = self.guard.fail(call, error)
            grpc_context.set_code(status_code(public))
            grpc_context.set_details(public.message)

        async def _unary(
            self, name: str, service: Any, request: Any, grpc_context: Any, admin: bool = False
        ) -> Any:
            call = self._open(name, grpc_context)
            try:
                self._admit(call, request, grpc_context, admin)
                if not admin:
                    await self._hold_routed_adapter(call)
                return await getattr(service, name)(request, call)
            except (asyncio.CancelledError, GeneratorExit):
                self.guard.cancelled(call, deadline_passed=False)  # Ray's proxy dropped the call
                raise
            except Exception as error:
                self._report(grpc_context, call, error)
                raise

        async def _stream(self, name: str, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
            call = self._open(name, grpc_context)
            try:
                self._admit(call, request, grpc_context, False)
                await self._hold_routed_adapter(call)
                async for message in getattr(self.inference, name)(request, call):
                    yield message
            except (asyncio.CancelledError, GeneratorExit):
                self.guard.cancelled(call, deadline_passed=False)  # Ray's proxy dropped the call
                raise
            except Exception as error:
                self._report(grpc_context, call, error)
                raise

        # --- loraserve.v1.Inference
        async def Generate(self, request: Any, grpc_context: Any) -> Any:
            return await self._unary("Generate", self.inference, request, grpc_context)

        async def Chat(self, request: Any, grpc_context: Any) -> Any:
            return await self._unary("Chat", self.inference, request, grpc_context)

        async def Tokenize(self, request: Any, grpc_context: Any) -> Any:
            return await self._unary("Tokenize", self.inference, request, grpc_context)

        async def ModelInfo(self, request: Any, grpc_context: Any) -> Any:
            return await self._unary("ModelInfo", self.inference, request, grpc_context)

        async def GenerateStream(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
            async for message in self._stream("GenerateStream", request, grpc_context):
                yield message

        async def ChatStream(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
            async for message in self._stream("ChatStream", request, grpc_context):
                yield message

        # --- loraserve.v1.AdapterAdmin (acts on the replica the call reaches)
        async def LoadAdapter(self, request: Any, grpc_context: Any) -> Any:
            return await self._unary("LoadAdapter", self.admin, request, grpc_context, admin=True)

        async def UnloadAdapter(self, request: Any, grpc_context: Any) -> Any:
            return await self._unary("UnloadAdapter", self.admin, request, grpc_context, admin=True)

        async def ListAdapters(self, request: Any, grpc_context: Any) -> Any:
            return await self._unary("ListAdapters", self.admin, request, grpc_context, admin=True)

        def __del__(self) -> None:
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.shutdown(timeout=5)

    return LoraserveReplica


def build_app(config: ServerConfig, replicas: int = 2, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Any:
    """The Ray Serve application: `serve.run(build_app(...), name=APP_NAME)`."""
    deployment = make_deployment(config, replicas, num_cpus, num_gpus)
    return deployment.bind(config.model_dump_json())


def check_exposure(config: ServerConfig) -> None:
    """Ray's gRPC proxy binds every interface, so without API keys serving must be an explicit choice."""
    if config.api_keys_file is None and not config.allow_unauthenticated_remote:
        raise ConfigError(
            f"serve-ray: Ray Serve's gRPC proxy listens on every interface ([::]:{config.port}) whatever "
            "--host says, and no --api-keys-file is set; set --api-keys-file, or "
            "--allow-unauthenticated-remote on a private network"
        )


def ray_init_options(config: ServerConfig, address: str | None) -> dict[str, Any]:
    """`ray.init` arguments: join `address`, or start a local instance on the configured ports."""
    if address:
        return {"address": address, "log_to_driver": False}
    options: dict[str, Any] = {"log_to_driver": False, "include_dashboard": bool(config.ray_dashboard_port)}
    if config.ray_dashboard_port:
        options["dashboard_port"] = config.ray_dashboard_port
    if config.ray_metrics_export_port:
        options["_metrics_export_port"] = config.ray_metrics_export_port
    return options


def start(
    config: ServerConfig,
    replicas: int,
    address: str | None,
    num_cpus: float,
    num_gpus: float,
) -> None:
    """Connects to (or starts) Ray, starts Serve's gRPC proxy on config.port and deploys the app."""
    check_exposure(config)
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    ray.init(**ray_init_options(config, address))
    serve.start(
        http_options=HTTPOptions(host=config.ray_http_host, port=config.ray_http_port),
        grpc_options=gRPCOptions(port=config.port, grpc_servicer_functions=SERVICER_FUNCTIONS),
    )
    # A route prefix makes the app an ingress of the proxies (gRPC routing uses the app name).
    serve.run(build_app(config, replicas, num_cpus, num_gpus), name=APP_NAME, route_prefix=f"/{APP_NAME}")


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def run_forever(
    config: ServerConfig, replicas: int, address: str | None, num_cpus: float, num_gpus: float
) -> int:
    """`loraserve serve-ray`: deploy, then wait for SIGTERM/SIGINT and tear everything down."""
    import signal

    check_exposure(config)
    try:  # Ray's own SIGTERM handler (sys.exit) covers the start; ours takes over once deployed
        start(config, replicas, address, num_cpus, num_gpus)
        stopping = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.append(True))
        log.info(
            "loraserve on Ray Serve: %d replicas, gRPC proxy on port %d of every interface (application "
            "%r); Ray Serve's HTTP proxy on %s:%d",
            replicas,
            config.port,
            APP_NAME,
            config.ray_http_host,
            config.ray_http_port,
        )
        while not stopping:
            time.sleep(0.5)
    finally:
        stop()
    return 0
