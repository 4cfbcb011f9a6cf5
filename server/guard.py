"""The one error boundary of every front end: admission, identity, request ids, failures.

A front end (gRPC in loraserve.handlers, Ray Serve in loraserve.ray_app, HTTP in
loraserve.http_api) does only its transport's work around the guard:

    call = guard.open("Generate", deadline)              # request id, deadline
    try:
        call.principal = guard.admit(metadata, admin)    # phase, API key, admin right
        ...                                              # adapter ids: Guard.adapter(call, id),
                                                         # Guard.admin_adapter(id) for admin calls
    except <the transport's cancellation>:
        guard.cancelled(call, deadline_passed)           # counted, nothing to report
    except Exception as error:
        public = guard.fail(call, error)                 # logged and counted
        ...                                              # report public.code, public.message

`public` is a ServeError whose `code` names a gRPC status (the transport maps it to its own);
anything that is not a ServeError, and InternalError itself, becomes an InternalError that
carries only the request id, the details staying in the log.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from loraserve.auth import ANONYMOUS, Principal
from loraserve.errors import InternalError, InvalidArgument, ServeError, Unavailable
from loraserve.validation import check_adapter_id

log = logging.getLogger(__name__)

STARTING, SERVING, DRAINING = "starting", "serving", "draining"


@dataclass
class Call:
    """Per-request facts that the front end hands to the core."""

    request_id: str
    method: str
    principal: Principal = ANONYMOUS
    deadline: float | None = None  # time.monotonic() seconds; None: the server's own limit


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class Guard:
    """What is checked before a call runs and how its failure is reported; `phase` is the server's."""

    def __init__(self, keyring: Any, metrics: Any, phase: str = STARTING) -> None:
        self.phase = phase  # starting -> serving -> draining
        self.keyring = keyring
        self.metrics = metrics

    def open(self, method: str, deadline: float | None = None) -> Call:
        return Call(new_request_id(), method, ANONYMOUS, deadline)

    def admit(self, metadata: Iterable[tuple[str, Any]] | None, admin: bool = False) -> Principal:
        """The caller, if the server takes calls now and its key (when keys are on) allows it."""
        if self.phase == STARTING:
            raise Unavailable("server is starting: the model is still loading")
        if self.phase == DRAINING:
            raise Unavailable("server is shutting down and takes no new requests")
        principal = ANONYMOUS if self.keyring is None else self.keyring.authenticate(list(metadata or ()))
        if admin:
            principal.check_admin()
        return principal

    @staticmethod
    def adapter(call: Call, adapter_id: str) -> str:
        """The edge check of an adapter id named by a request ('' is the base model): well formed,
        and allowed to the caller. Inner code takes the id as valid."""
        adapter_id = check_adapter_id(adapter_id)
        call.principal.check_adapter(adapter_id)
        return adapter_id

    @staticmethod
    def admin_adapter(adapter_id: str) -> str:
        """The edge check of the adapter id an admin call names: required (the base model is not
        an adapter to load or unload) and well formed."""
        if not adapter_id:
            raise InvalidArgument("adapter_id is empty")
        return check_adapter_id(adapter_id)

    def fail(self, call: Call, error: BaseException) -> ServeError:
        """The error to report for a failed call, logged and counted by its code."""
        if not isinstance(error, ServeError) or isinstance(error, InternalError):
            # Details stay in the log; the client gets the request id to quote.
            log.error(
                "request %s (%s) failed: %s",
                call.request_id,
                call.method,
                describe(error),
                exc_info=error if not isinstance(error, ServeError) else None,
            )
            error = InternalError(f"internal error while serving the request (request id {call.request_id})")
        self.count(error.code)
        log.info(
            "request failed: %s",
            error.message,
            extra={"request_id": call.request_id, "method": call.method, "code": error.code},
        )
        return error

    def cancelled(self, call: Call, deadline_passed: bool) -> None:
        """A call the client abandoned (cancelled, or its deadline passed): only counted."""
        self.count("DEADLINE_EXCEEDED" if deadline_passed else "CANCELLED")

    def count(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.request_errors.labels(code).inc()


def describe(error: BaseException) -> str:
    """An exception as one line, never empty (some carry no message)."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
