"""The services of one engine, wired once for every front end and host process.

`loraserve serve` (loraserve.app) and each Ray Serve replica (loraserve.ray_app) build their
engine with `engine_parts(config)` and their services with `Services.build(...)`; a new front
end takes the same `Services` and a `Guard`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraserve.admin import AdapterAdmin
from loraserve.generation import GenerationCore
from loraserve.training.manager import TrainingManager
from loraserve.validation import Limits


@dataclass(frozen=True)
class Services:
    """Everything a front end calls: generation, adapter administration and training."""

    core: GenerationCore
    admin: AdapterAdmin
    training: TrainingManager

    @classmethod
    def build(cls, config: Any, engine: Any, metrics: Any, training: bool = True) -> Services:
        """`training=False`: the Training service is off (Ray Serve replicas: several processes
        sharing one store must not share one job table)."""
        limits = Limits.from_config(config, engine.loaded.max_context_length)
        admin = AdapterAdmin(engine)
        return cls(
            GenerationCore(engine.loaded, engine, limits, metrics, config.log_prompts),
            admin,
            TrainingManager(engine, admin, config, metrics, enabled=training),
        )


def engine_parts(config: Any) -> Callable[[], tuple[Any, Any]]:
    """What `Engine.spawn` runs on the engine's thread: load the base model, configure the engine."""

    def build() -> tuple[Any, Any]:
        from loraserve.engine.engine import EngineConfig
        from loraserve.model_loader import load_base_model

        loaded = load_base_model(
            config.model,
            config.quantization,
            config.device,
            config.compute_dtype,
            config.double_quant,
            config.max_context_length,
        )
        return loaded, EngineConfig.from_server_config(config)

    return build
