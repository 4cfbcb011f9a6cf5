"""The per-step forward context: what the model's patched modules read during one engine step.

The runner flattens a step's sequences into one row of tokens and sets one `ForwardContext` for
the forward pass (`with forward_context(...)`): the paged-attention metadata that
`loraserve.engine.attention` reads, and the LoRA plan that every `LoRALinear` of
`loraserve.adapters.layer` reads. Module signatures therefore never change, and each piece of
per-step state is computed once per step, not once per layer.

A training pass of the Training service sets a context of its own instead: no paged attention
(dense causal attention over a padded batch) and the job's trainable LoRA weights, which only
that pass adds; serving steps never see them.

The context lives in a `ContextVar`, so engines on different threads (or tasks) never see each
other's step. This module sits on the bottom floor: it imports neither the engine nor the
adapters, which both import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraserve.adapters.lora_backends import LoRAPlan
    from loraserve.adapters.trainable import TrainableLoRA
    from loraserve.engine.attention import AttentionMetadata


@dataclass(frozen=True)
class ForwardContext:
    """One step's state, shared by all layers of the forward pass."""

    attention: AttentionMetadata | None = None  # None: no paged attention (no KV cache in use)
    lora: LoRAPlan | None = None  # None: no token of the step has an adapter
    training: TrainableLoRA | None = None  # a training job's own LoRA weights (training passes only)


_current: ContextVar[ForwardContext | None] = ContextVar("loraserve_forward_context", default=None)


@contextmanager
def forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    """Sets `context` for the forward passes run inside the block, and restores the previous one."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def current_forward_context() -> ForwardContext | None:
    """The context of the step being run, or None outside a step."""
    return _current.get()
