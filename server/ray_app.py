"""loraserve on Ray Serve: N replicas of the engine behind Ray's gRPC proxy, adapters multiplexed.

Each replica runs a full loraserve engine (base model, slots, scheduler) on its own thread and
answers the same `loraserve.v1` methods as `loraserve serve`. Ray Serve's model multiplexing
routes a request by its `multiplexed_model_id` metadata (the adapter id, or `__base__`) to a
replica that already holds that adapter, so adapters stay where they are used instead of every
replica loading every adapter. `max_num_models_per_replica` (from config: the device slots) is
the routing budget; the replica's own tiers bound its memory as in `loraserve serve`.

The replica that answered is named in the trailing metadata `x-loraserve-replica`. Errors keep
their status codes (DESIGN.md). Ray's proxy has no grpc.health.v1: use Ray's own health check.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from loraserve.config import ServerConfig
from loraserve.errors import InternalError, ServeError
from loraserve.handlers import Call, Undecodable
from loraserve.ids import BASE

log = logging.getLogger(__name__)
APP_NAME = "loraserve"
REPLICA_HEADER = "x-loraserve-replica"
BASE_MODEL_ID = BASE
SERVICER_FUNCTIONS = [
    "loraserve_client.api.loraserve_pb2_grpc.add_InferenceServicer_to_server",
    "loraserve_client.api.loraserve_pb2_grpc.add_AdapterAdminServicer_to_server",
]


class _RayContext:
    """The little of a grpc.aio context our services use, over Ray's gRPC context."""

    def __init__(self, grpc_context: Any) -> None:
        self._context = grpc_context

    def time_remaining(self) -> float | None:
        return None  # Ray's proxy enforces the request timeout (gRPCOptions.request_timeout_s)

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self._context.invocation_metadata())


def _fail(grpc_context: Any, call: Call, error: BaseException) -> None:
    """Sets the status code of a failed call on Ray's context (the caller re-raises)."""
    if not isinstance(error, ServeError) or isinstance(error, InternalError):
        log.error("request %s (%s) failed: %s", call.request_id, call.method, error)
        error = InternalError(f"internal error while serving the request (request id {call.request_id})")
    grpc_context.set_code(getattr(grpc.StatusCode, error.code))
    grpc_context.set_details(error.message)


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
            from loraserve.auth import ANONYMOUS, KeyRing
            from loraserve.engine.engine import Engine, EngineConfig
            from loraserve.logs import setup_logging
            from loraserve.metrics import Metrics
            from loraserve.model_loader import load_base_model
            from loraserve.service import AdapterAdminService, InferenceService
            from loraserve.validation import Limits

            self.config = ServerConfig.model_validate_json(config_json)
            setup_logging(self.config.log_level, self.config.log_format)
            self.metrics = Metrics(self.config.metrics_max_adapter_labels)
            self.metrics_port = self._serve_metrics()
            cfg = self.config

            def build() -> tuple[Any, EngineConfig]:
                loaded = load_base_model(
                    cfg.model,
                    cfg.quantization,
                    cfg.device,
                    cfg.compute_dtype,
                    cfg.double_quant,
                    cfg.max_context_length,
                )
                return loaded, EngineConfig.from_server_config(cfg)

            self.engine = Engine.spawn(build, self.metrics, cfg.warmup).result()
            limits = Limits.from_config(cfg, self.engine.loaded.max_context_length)
            self.inference = InferenceService(self.engine.loaded, self.engine, limits, self.metrics, cfg)
            self.admin = AdapterAdminService(self.engine)
            self.keyring = KeyRing.from_file(cfg.api_keys_file) if cfg.api_keys_file else None
            self.anonymous = ANONYMOUS
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

        @serve.multiplexed(max_num_models_per_replica=config.max_loaded_adapters)
        async def hold_adapter(self, adapter_id: str) -> str:
            """Ray's multiplexing hook: puts the adapter in a device slot of this replica."""
            if adapter_id != BASE_MODEL_ID:
                future, _ = self.admin.adapters.load(adapter_id)
                await asyncio.wrap_future(future)
            return adapter_id

        def _call(self, request: Any, grpc_context: Any, method: str, admin: bool = False) -> Call:
            call = Call(os.urandom(8).hex(), method, self.anonymous)
            grpc_context.set_trailing_metadata([(REPLICA_HEADER, self.replica_id)])
            if isinstance(request, Undecodable):
                from loraserve.errors import InvalidArgument

                raise InvalidArgument(f"request is not a valid {request.type_name}")
            if self.keyring is not None:
                call.principal = self.keyring.authenticate(_RayContext(grpc_context).invocation_metadata())
            if admin:
                call.principal.check_admin()
            return call

        async def _unary(
            self, name: str, service: Any, request: Any, grpc_context: Any, admin: bool = False
        ) -> Any:
            call = Call("-", name, self.anonymous)
            try:
                call = self._call(request, grpc_context, name, admin)
                if not admin:
                    await self.hold_adapter(serve.get_multiplexed_model_id() or BASE_MODEL_ID)
                return await getattr(service, name)(request, _RayContext(grpc_context), call)
            except BaseException as error:
                _fail(grpc_context, call, error)
                raise

        async def _stream(self, name: str, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
            call = Call("-", name, self.anonymous)
            try:
                call = self._call(request, grpc_context, name)
                await self.hold_adapter(serve.get_multiplexed_model_id() or BASE_MODEL_ID)
                async for message in getattr(self.inference, name)(request, _RayContext(grpc_context), call):
                    yield message
            except BaseException as error:
                _fail(grpc_context, call, error)
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


def start(
    config: ServerConfig,
    replicas: int,
    address: str | None,
    num_cpus: float,
    num_gpus: float,
    http_port: int = 8000,
) -> None:
    """Connects to (or starts) Ray, starts Serve's gRPC proxy on config.port and deploys the app."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(
        http_options=HTTPOptions(host=config.host, port=http_port),
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

    try:  # Ray's own SIGTERM handler (sys.exit) covers the start; ours takes over once deployed
        start(config, replicas, address, num_cpus, num_gpus)
        stopping = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.append(True))
        log.info(
            "loraserve on Ray Serve: %d replicas, gRPC proxy on port %d (application %r)",
            replicas,
            config.port,
            APP_NAME,
        )
        while not stopping:
            time.sleep(0.5)
    finally:
        stop()
    return 0
