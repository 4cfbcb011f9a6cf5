"""Request and response bodies of the LoRAX-compatible API (/generate, /generate_stream), as pydantic models.

The request is LoRAX's (and TGI's): `inputs` and `parameters`. `lorax-client` sends every
parameter, most as null or false, so each unsupported one is accepted at its neutral value and
refused, by name, otherwise. loraserve computes no log-probabilities: each token's `logprob` is 0
(LoRAX's client requires a number) and `details.prefill` is empty.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraserve.engine.sequence import MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY
from loraserve.http_api.openai_schemas import MAX_SEED


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Parameters(Strict):
    adapter_id: str | None = Field(None, max_length=512)
    adapter_source: str | None = None
    merged_adapters: Any = None
    api_token: str | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = None
    response_format: Any = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for each parameter set to a value loraserve does not serve."""
        refused = []
        if self.adapter_source not in (None, "local"):
            refused.append(
                (
                    "parameters.adapter_source",
                    f"parameters.adapter_source={self.adapter_source!r} is not supported: loraserve serves "
                    "only adapters in its own store (adapter_source 'local' or absent)",
                )
            )
        if self.merged_adapters is not None:
            refused.append(("parameters.merged_adapters", "parameters.merged_adapters is not supported"))
        if self.response_format is not None:
            refused.append(("parameters.response_format", "parameters.response_format is not supported"))
        if self.api_token is not None:
            refused.append(
                (
                    "parameters.api_token",
                    "parameters.api_token is not supported: adapters come from the server's store; "
                    "authenticate with the Authorization: Bearer header",
                )
            )
        for name in ("truncate", "typical_p", "return_k_alternatives"):
            if getattr(self, name) is not None:
                refused.append((f"parameters.{name}", f"parameters.{name} is not supported"))
        if self.best_of not in (None, 1):
            refused.append(("parameters.best_of", f"parameters.best_of must be 1, got {self.best_of}"))
        if self.watermark:
            refused.append(("parameters.watermark", "parameters.watermark is not supported"))
        if self.decoder_input_details:
            refused.append(
                ("parameters.decoder_input_details", "parameters.decoder_input_details is not supported")
            )
        return refused

    @property
    def sampled(self) -> bool:
        """As in LoRAX: sampling when asked, or when any warper is set; greedy otherwise."""
        return (
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
        )


class GenerateRequest(Strict):
    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False  # read by POST / (LoRAX's client posts there)

    def unsupported(self) -> list[tuple[str, str]]:
        return self.parameters.unsupported()


# ---------------------------------------------------------------------------- responses

LoraxFinish = Literal["length", "eos_token", "stop_sequence"]


class Token(BaseModel):
    id: int
    text: str
    logprob: float = 0.0
    special: bool
    alternative_tokens: None = None


class Details(BaseModel):
    finish_reason: LoraxFinish
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    prefill: list[Any] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    best_of_sequences: None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: LoraxFinish
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None


class StreamResponse(BaseModel):
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None
