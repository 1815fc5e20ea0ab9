"""W3C trace context (https://www.w3.org/TR/trace-context/): the `traceparent` Regate
sends to a tool when tracing is on, and the trace id read from an agent's header
so that a decision trace names the distributed trace it belongs to.

No OpenTelemetry import here: the forwarder imports this module whether or not
the SDK is installed.
"""

from __future__ import annotations

import re
from typing import Any

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def traceparent(span: Any) -> str:
    """The header that makes `span` the parent of whatever the tool does."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parse_traceparent(value: str | None) -> tuple[str, str, int] | None:
    """(trace id, parent span id, flags) of a valid header, else None (the spec: ignore it)."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None:
        return None
    version, trace_id, span_id, flags = m.groups()
    if version == "ff" or (version == "00" and len(value.strip()) != 55):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, int(flags, 16)
