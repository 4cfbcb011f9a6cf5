"""Shared vocabulary of names: the base model's id, adapter ids, tenants.

Bottom floor: imported by the adapters, the engine, the generation core and the front ends,
and imports nothing of theirs.
"""

from __future__ import annotations

import re

from loraserve.errors import InvalidArgument

# The id that stands for "no adapter" wherever an adapter id must be a non-empty name: metric
# labels, the tenant of an anonymous base-model request, Ray Serve's multiplexed model id.
# On the wire (proto, client) the base model is the empty adapter id.
BASE = "__base__"

SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_ID_CHARS = 128


def validate_adapter_id(adapter_id: str) -> str:
    """Returns the id if it is well formed, else raises InvalidArgument naming the rule broken.

    An adapter id is the relative path of one or two segments (`name` or `org/name`), each
    matching `[A-Za-z0-9][A-Za-z0-9._-]*`, never `.` or `..`. Checked once, at the edge (request
    validation, admin calls, training); inner code takes ids as already valid.
    """
    if not adapter_id:
        raise InvalidArgument("adapter_id is empty")
    if len(adapter_id) > MAX_ID_CHARS:
        raise InvalidArgument(f"adapter_id is longer than {MAX_ID_CHARS} characters")
    segments = adapter_id.split("/")
    if len(segments) > 2:
        raise InvalidArgument("adapter_id must be `name` or `org/name` (at most two segments)")
    for segment in segments:
        if segment in (".", ".."):
            raise InvalidArgument("adapter_id must not contain `.` or `..` segments")
        if not SEGMENT.fullmatch(segment):
            raise InvalidArgument(
                f"adapter_id segment {segment[:40]!r} must match [A-Za-z0-9][A-Za-z0-9._-]*"
            )
    return adapter_id


def tenant_of(tenant: str, adapter_id: str) -> str:
    """Whose request this is, for fairness and per-tenant limits.

    The authenticated tenant when there is one; otherwise the adapter stands for its tenant
    (one adapter per tenant is the common deployment), and base-model requests share BASE.
    """
    return tenant or adapter_id or BASE
