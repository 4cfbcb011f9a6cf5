"""A failure kept as data is raised again as loraserve.errors' class of its code, whatever was imported first.

HTTP's PayloadTooLarge reuses INVALID_ARGUMENT (answered 413): a remembered INVALID_ARGUMENT
adapter failure must not come back as it (an HTTP 413 for an adapter problem).
"""

from __future__ import annotations

import loraserve.http_api.errors  # noqa: F401 - defines ServeError subclasses that reuse codes
from loraserve import errors
from loraserve.adapters.registry import Failure, _error_classes

CANONICAL = (
    errors.InvalidArgument,
    errors.NotFound,
    errors.FailedPrecondition,
    errors.ResourceExhausted,
    errors.Unavailable,
    errors.Unauthenticated,
    errors.PermissionDenied,
    errors.InternalError,
)


def test_each_code_maps_to_the_errors_module_class() -> None:
    classes = _error_classes()  # built again now that every front end's subclasses exist
    for cls in CANONICAL:
        assert classes[cls.code] is cls


def test_a_remembered_failure_is_a_fresh_error_of_its_own_class() -> None:
    failure = Failure.of(errors.InvalidArgument("adapter_id: bad"))
    first, second = failure.error(), failure.error()
    assert type(first) is errors.InvalidArgument and first is not second
    assert first.message == "adapter_id: bad" and not hasattr(first, "http_status")
