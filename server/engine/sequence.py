"""A request inside the engine: its parameters, tokens, KV blocks and outputs.

The generation core builds a `GenerationRequest` (validated plain values); the engine wraps it in a
`Sequence` that the scheduler, runner and sampler share, and each step schedules some of its
tokens as a `ScheduledSeq`. A `SequenceOutput` goes back to the caller after every step that
produced text, and once at the end.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from loraserve.ids import tenant_of

# Sampling bounds, shared by request validation and the sampler. Below GREEDY_TEMPERATURE a draw
# differs from the argmax only between logits closer than about 1e-4, while dividing by such a
# temperature overflows float32 (1e-40 turns every logit into +-inf); so it decodes greedily.
GREEDY_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
# A penalty p divides seen tokens' positive logits by p (negative ones times p): useful values
# lie near 1, and far past these bounds they only overflow float32 into inf.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; a temperature below GREEDY_TEMPERATURE (0 included) is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class StoppingCriteria:
    """When generation ends."""

    max_new_tokens: int = 256
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False
    max_time_seconds: float = 600.0


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    TIME_LIMIT = "time_limit"
    CANCELLED = "cancelled"
    ERROR = "error"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class GenerationRequest:
    """What the generation core hands the engine: plain, validated values."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingCriteria = field(default_factory=StoppingCriteria)
    adapter_id: str = ""
    tenant: str = ""
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class SequenceOutput:
    """New text and tokens since the last output; `finish_reason` is set on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: Exception | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Timings (monotonic seconds), filled on the last output.
    arrival: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    preemptions: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Sequence:
    """Engine-side state of one request."""

    def __init__(
        self,
        request: GenerationRequest,
        adapter: Any,
        sink: Callable[[SequenceOutput], None],
        detokenizer: Any,
        stop_checker: Any,
    ) -> None:
        self.request = request
        self.request_id = request.request_id
        self.adapter = adapter  # adapters.manager.AdapterEntry, or None for the base model
        self.sink = sink
        self.detokenizer = detokenizer
        self.stop_checker = stop_checker
        self.prompt_ids = list(request.prompt_ids)
        self.output_ids: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        # Prefix caching (loraserve.engine.prefix_cache): the seed of its blocks' hash chain, the
        # chained hashes of its full blocks so far (memoized: tokens only grow), how many leading
        # blocks of its table the cache knows (taken from it or published), and the prompt tokens
        # served from the cache at its first admission.
        self.cache_seed: bytes | None = None
        self.block_hashes: list[bytes] = []
        self.cached_blocks = 0
        self.cached_prompt_tokens = 0
        self.status = Status.WAITING
        self.slot = -1  # device slot of its adapter while running
        self.deadline = request.arrival + request.stopping.max_time_seconds
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.preemptions = 0
        self.finish_reason: FinishReason | None = None
        seed = request.sampling.seed
        self.generator: torch.Generator | None = None
        if not request.sampling.greedy:
            self.generator = torch.Generator()
            # An unseeded request draws its seed from the OS: torch.seed() would reseed torch's global
            # generators from this thread (the event loop) while the engine thread samples.
            self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))

    @property
    def tenant(self) -> str:
        return tenant_of(self.request.tenant, self.request.adapter_id)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_computed

    def tokens(self, start: int, end: int) -> list[int]:
        return (self.prompt_ids + self.output_ids)[start:end]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class ScheduledSeq:
    """A sequence and how many of its tokens run this step."""

    seq: Sequence
    num_new: int

    @property
    def samples(self) -> bool:
        """True when this step computes its last known token, so a next token is sampled."""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens
