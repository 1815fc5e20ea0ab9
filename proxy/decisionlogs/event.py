"""One decision-log event in OPA's shape (`v1/plugins/logs` EventV1), built by
the uploader from the small entry the policy stage appended.

The entry holds references, not copies: the input document the engine was
given and the raw decision it returned. The event is assembled, masked and
encoded here, off the request path.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from .mask import MaskRule, apply_mask


class Entry:
    """What the policy stage hands over per decision: references and a few ints."""

    __slots__ = ("decision_id", "revision", "input", "result", "error", "time_ns", "handler_ns", "eval_ns",
                 "requested_by", "est")

    def __init__(self, decision_id: str, revision: str | None, input_doc: Any, result: Any, error: Any,
                 time_ns: int, handler_ns: int, eval_ns: int, requested_by: str | None, est: int) -> None:
        self.decision_id = decision_id
        self.revision = revision
        self.input = input_doc
        self.result = result
        self.error = error
        self.time_ns = time_ns
        self.handler_ns = handler_ns
        self.eval_ns = eval_ns
        self.requested_by = requested_by
        self.est = est


def rfc3339_ns(time_ns: int) -> str:
    """`2026-01-01T00:00:00.123456789Z`: RFC 3339 in UTC with nanoseconds, as OPA writes it."""
    secs, ns = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns:09d}Z"


class EventEncoder:
    """Entry → the JSON bytes of one event (masked), for one Regate instance."""

    def __init__(self, *, path: str, bundle: str, labels: dict[str, str], rules: list[MaskRule],
                 eval_timer: str) -> None:
        self.path = path
        self.bundle = bundle
        self.labels = labels
        self.rules = rules
        self.eval_timer = eval_timer

    def event(self, e: Entry) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "labels": self.labels,
            "decision_id": e.decision_id,
            "path": self.path,
            "input": e.input,
        }
        if e.error is None:
            ev["result"] = e.result
        else:
            ev["error"] = e.error
        if e.revision is not None:
            ev["bundles"] = {self.bundle: {"revision": e.revision}}
        if e.requested_by is not None:
            ev["requested_by"] = e.requested_by
        ev["timestamp"] = rfc3339_ns(e.time_ns)
        ev["metrics"] = {"timer_server_handler_ns": e.handler_ns, self.eval_timer: e.eval_ns}
        return apply_mask(ev, self.rules) if self.rules else ev

    def encode(self, e: Entry) -> bytes:
        """The event's JSON; raises orjson.JSONEncodeError for a document JSON cannot carry."""
        return orjson.dumps(self.event(e), default=_fallback, option=orjson.OPT_NON_STR_KEYS)


def _fallback(value: Any) -> Any:
    # Sets reach here only from a decision nobody normalised; everything else odd is
    # written as its text rather than losing the event.
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    return str(value)
