"""Request and response bodies of the OpenAI-compatible API (/v1), as pydantic models.

Requests are parsed strictly (a string is not a number, `5.0` is not an integer) and unknown
fields are refused by name. Fields of OpenAI's API that loraserve does not implement are
accepted only at their neutral value (`n: 1`, `presence_penalty: 0`, `logprobs: false`...);
any other value is refused with a message naming the field, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from loraserve.engine.sequence import MAX_TEMPERATURE

MAX_SEED = 2**64 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _stop_list(value: Any) -> Any:
    """`stop` is a string or a list of strings; both become a list."""
    if value is None or isinstance(value, str):
        return None if value is None else [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ValueError("must be a string or a list of strings")


StopField = Annotated[list[str] | None, BeforeValidator(_stop_list)]


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; refused below unless false


def _content_text(value: Any) -> Any:
    """A message's content: a string, or a list of text parts (joined); images and audio are refused."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"part {i} is {kind!r}: only text parts ({{'type': 'text', 'text': ...}}) are served"
                )
            if set(part) - {"type", "text"}:
                raise ValueError(f"part {i} has fields other than type and text")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError("must be a string or a list of text parts")


class ChatMessageIn(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | None, BeforeValidator(_content_text)] = None
    name: str | None = None  # accepted, not sent to the model (chat templates have no place for it)

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessageIn:
        if self.content is None:
            raise ValueError("content is required (tool calls are not served)")
        return self


class Sampling(Strict):
    """The fields chat and text completions share."""

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: StopField = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=512)  # accepted; the tenant comes from the API key
    stream: bool = False
    stream_options: StreamOptions | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for each field set to a value loraserve does not serve."""
        refused = []
        if self.n not in (None, 1):
            refused.append(("n", f"n must be 1 (one choice per request), got {self.n}"))
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0, 0.0):
                refused.append(
                    (
                        name,
                        f"{name} is not supported (must be 0 or absent), got {value}; loraserve's "
                        "gRPC API has repetition_penalty",
                    )
                )
        if self.logit_bias:
            refused.append(("logit_bias", "logit_bias is not supported"))
        if self.stream_options is not None:
            if not self.stream:
                refused.append(("stream_options", "stream_options is only allowed with stream: true"))
            if self.stream_options.continuous_usage_stats:
                refused.append(("stream_options", "stream_options.continuous_usage_stats is not supported"))
        return refused


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None  # accepted, not stored (store must be false)
    service_tier: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        refused = super().unsupported()
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            refused.append(
                (
                    "max_completion_tokens",
                    "give max_completion_tokens or max_tokens, not both with different values",
                )
            )
        if self.logprobs or self.top_logprobs:
            refused.append(("logprobs", "logprobs and top_logprobs are not supported"))
        if self.response_format is not None and self.response_format.get("type") != "text":
            refused.append(("response_format", "response_format is not supported (only {'type': 'text'})"))
        for name in ("tools", "functions"):
            if getattr(self, name):
                refused.append((name, f"{name} (tool calling) is not supported"))
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                refused.append((name, f"{name} is not supported (tool calling)"))
        if self.store:
            refused.append(("store", "store is not supported: loraserve keeps no completions"))
        if self.service_tier not in (None, "auto", "default"):
            refused.append(("service_tier", "service_tier must be auto or default"))
        return refused

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _prompt(value: Any) -> Any:
    """A prompt: a string, a list of one string, or token ids (a list of ints, or a list of one)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(type(t) is int for t in value):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise ValueError(f"holds {len(value)} prompts: send one prompt per request")
    raise ValueError("must be a string, a list of one string, or a non-empty list of token ids")


class CompletionRequest(Sampling):
    prompt: Annotated[str | list[int], BeforeValidator(_prompt)]
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        refused = super().unsupported()
        if self.echo:
            refused.append(("echo", "echo is not supported"))
        if self.best_of not in (None, 1):
            refused.append(("best_of", f"best_of must be 1, got {self.best_of}"))
        if self.logprobs is not None:
            refused.append(("logprobs", "logprobs is not supported"))
        if self.suffix:
            refused.append(("suffix", "suffix is not supported"))
        return refused


# ---------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageOut | None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: UsageOut | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None  # vLLM's: the base model an adapter runs on
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraAdapterRequest(Strict):
    """vLLM's body: `lora_name` is the adapter id, `lora_path` (optional) its folder in the store."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str | None = Field(None, max_length=4096)
    load_inplace: bool = False  # loraserve reloads an adapter whose files changed either way


class UnloadLoraAdapterRequest(Strict):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's numeric id: accepted, ids are names here
