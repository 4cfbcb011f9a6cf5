"""Public errors over HTTP: one status per gRPC code (docs/api.md, "Status codes"), two body shapes.

The guard turns every failure into a ServeError whose `code` names a gRPC status; here that code
becomes an HTTP status and a body in the shape each API's clients parse: OpenAI's
`{"error": {"message", "type", "param", "code"}}` for /v1, LoRAX's `{"error", "error_type"}` for
/generate. Messages of the shared validation name the gRPC fields (`stopping.max_new_tokens`); the
front end renames them to the field the HTTP client sent (`max_tokens`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from loraserve.errors import ServeError

# gRPC code -> HTTP status. FAILED_PRECONDITION (an adapter the base model cannot use) is 422:
# the request is well formed, the adapter it names is not servable.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 422,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# OpenAI's `type` of each status (its clients read the status; people read the type).
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
# LoRAX's `error_type`s its client turns into typed errors; other codes are told by the status.
LORAX_TYPES = {"INVALID_ARGUMENT": "validation", "RESOURCE_EXHAUSTED": "overloaded", "INTERNAL": "generation"}


class PayloadTooLarge(ServeError):
    """A request body over --http-max-body-bytes: an invalid argument, answered 413."""

    code = "INVALID_ARGUMENT"
    http_status = 413


class DeadlineExceeded(ServeError):
    """The deadline the client set with X-Request-Timeout passed."""

    code = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class PublicError:
    """An error as an HTTP client sees it."""

    status: int
    code: str  # the gRPC code name
    message: str
    param: str | None = None
    openai_code: str | None = None

    @property
    def retryable(self) -> bool:
        """Only UNAVAILABLE is worth retrying as is (docs/api.md); OpenAI's client retries 429
        and 5xx by default unless told otherwise by `x-should-retry`."""
        return self.code == "UNAVAILABLE"

    def headers(self, request_id: str | None) -> dict[str, str]:
        headers = {"x-should-retry": "true" if self.retryable else "false"}
        if request_id:
            headers["x-request-id"] = request_id
        if self.status == 401:
            headers["www-authenticate"] = "Bearer"
        return headers

    def openai_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": OPENAI_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.openai_code or self.code.lower(),
            }
        }

    def lorax_body(self) -> dict:
        return {"error": self.message, "error_type": LORAX_TYPES.get(self.code, self.code.lower())}


def public_error(error: ServeError, renames: dict[str, str] | None = None) -> PublicError:
    """The HTTP form of a public error; `renames` maps the shared validation's field names to the
    request's own (the longest matching prefix wins)."""
    message, param = rename_field(error.message, renames or {})
    status = getattr(error, "http_status", None) or HTTP_STATUS.get(error.code, 500)
    openai_code = None
    if error.code == "NOT_FOUND" and ("adapter" in message or "model" in message):
        openai_code = "model_not_found"
    elif error.code == "UNAUTHENTICATED":
        openai_code = "invalid_api_key"
    return PublicError(status, error.code, message, getattr(error, "param", None) or param, openai_code)


def rename_field(message: str, renames: dict[str, str]) -> tuple[str, str | None]:
    """(the message with its leading field name renamed, that field), or (message, None)."""
    for grpc_name in sorted(renames, key=len, reverse=True):
        if message.startswith(grpc_name) and message[len(grpc_name) : len(grpc_name) + 1] in (
            " ",
            ":",
            "=",
            "[",
        ):
            http_name = renames[grpc_name]
            return http_name + message[len(grpc_name) :], http_name
    return message, None


def sse_error(body: dict) -> bytes:
    """An error as the last event of a stream that had already started."""
    return b"data: " + json.dumps(body).encode() + b"\n\n"
